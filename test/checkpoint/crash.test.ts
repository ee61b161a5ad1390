/**
 * A crash at any instant leaves the newest complete checkpoint intact: a child process saving in a
 * loop is SIGKILLed at random moments, 20 times; after each kill the latest step restores
 * bit-exactly and every step reported as complete restores.
 */
import { spawn } from "node:child_process"
import { mkdtempSync, readdirSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Option } from "effect"
import { expect, it } from "vitest"
import { makeMesh } from "../../src/core/mesh.ts"
import { type ShardedArray, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { Checkpointer } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime } from "../../src/layers/Devices.ts"

const runChildUntilKilled = (dir: string, delayMs: number) =>
  new Promise<void>((resolve, reject) => {
    const child = spawn(
      process.execPath,
      ["--import", "tsx", join(import.meta.dirname, "crashChild.ts"), dir],
      {
        stdio: ["ignore", "pipe", "inherit"],
      },
    )
    child.stdout.on("data", (d: Buffer) => {
      if (d.toString().includes("ready")) setTimeout(() => child.kill("SIGKILL"), delayMs)
    })
    child.on("exit", (_, signal) =>
      signal === "SIGKILL" ? resolve() : reject(new Error(`child exited without being killed: ${signal}`)),
    )
  })

it("20 SIGKILLs at random moments never leave a torn checkpoint", async () => {
  const dir = mkdtempSync(join(tmpdir(), "magix-crash-"))
  let rng = 99
  let survived = 0
  for (let i = 0; i < 20; i++) {
    rng = (Math.imul(rng, 1103515245) + 12345) >>> 0
    await runChildUntilKilled(dir, 50 + (rng % 600))
    const result = await Effect.runPromise(
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const mesh = yield* makeMesh([0], [1, 1])
        const steps = yield* ckpt.allSteps
        for (const step of steps) {
          const out = yield* ckpt.restore(step, {
            params: {
              w: { shape: [256, 1024], dtype: "float32", sharding: new NamedSharding(mesh, P()) },
              b: { shape: [1024], dtype: "float32", sharding: new NamedSharding(mesh, P()) },
            },
          })
          const p = out.params as { w: ShardedArray; b: ShardedArray }
          const w = toHost(p.w) as Float32Array
          const b = toHost(p.b) as Float32Array
          expect(w.every((v) => v === step)).toBe(true)
          expect(b.every((v) => v === -step)).toBe(true)
          p.w.dispose()
          p.b.dispose()
        }
        return { steps, latest: yield* ckpt.latestStep }
      }).pipe(
        Effect.provide(Checkpointer.layer({ directory: dir })),
        Effect.scoped,
        Effect.provide(CpuRuntime({ devices: 1 })),
      ),
    )
    if (Option.isSome(result.latest)) survived++
    // Reopening removed any half-written step; only complete steps remain.
    for (const name of readdirSync(dir)) expect(name).toMatch(/^\d+$/)
  }
  expect(survived).toBeGreaterThan(10)
}, 240_000)
