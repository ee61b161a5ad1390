/**
 * A crash at any instant leaves the newest complete checkpoint intact: a child process saving in a
 * loop (with retention deleting old steps) is SIGKILLed at random moments, 20 times (two
 * directories, 10 kills each). After each
 * kill, before anything cleans up: every folder named like a step is a complete step (no partial
 * one is ever taken for a step), the newest step is at least the last one the child reported
 * saved and never goes backwards, and every reported step restores bit-exactly.
 */
import { spawn } from "node:child_process"
import { mkdtempSync, readdirSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Option } from "effect"
import { expect, it } from "vitest"
import { isTemporaryName, stepOfDirectoryName } from "../../src/core/checkpointManifest.ts"
import { makeMesh } from "../../src/core/mesh.ts"
import { toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { Checkpointer } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime } from "../../src/layers/Devices.ts"
import { biases, weights } from "./crashChild.ts"

/** Runs the child until it is ready, kills it `delayMs` later; resolves with the last step it reported saved. */
const runChildUntilKilled = (dir: string, delayMs: number) =>
  new Promise<number | undefined>((resolve, reject) => {
    const child = spawn(
      process.execPath,
      ["--import", "tsx", join(import.meta.dirname, "crashChild.ts"), dir],
      {
        stdio: ["ignore", "pipe", "inherit"],
      },
    )
    let out = ""
    child.stdout.on("data", (d: Buffer) => {
      const ready = !out.includes("ready")
      out += d.toString()
      if (ready && out.includes("ready")) setTimeout(() => child.kill("SIGKILL"), delayMs)
    })
    child.on("exit", (_, signal) => {
      if (signal !== "SIGKILL")
        return reject(new Error(`child exited without being killed (${signal}): ${out}`))
      const saved = [...out.matchAll(/saved (\d+)/g)].map((m) => Number(m[1]))
      resolve(saved.at(-1))
    })
  })

const bits = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)

/** One directory killed `kills` times in a row; returns the newest step and how many kills hit a write. */
const killRepeatedly = async (seed: number, kills: number) => {
  const dir = mkdtempSync(join(tmpdir(), "magix-crash-"))
  let rng = seed
  let newest = 0
  let midWrite = 0
  for (let i = 0; i < kills; i++) {
    rng = (Math.imul(rng, 1103515245) + 12345) >>> 0
    const reported = await runChildUntilKilled(dir, (rng >>> 8) % 400)
    // What the kill left, before a Checkpointer opens the directory (and removes temporary folders).
    const left = readdirSync(dir)
    if (left.some(isTemporaryName)) midWrite++
    const named = left
      .map(stepOfDirectoryName)
      .filter((s): s is number => s !== undefined)
      .sort((a, b) => a - b)
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
          expect(bits(toHost(out.params.w)).equals(bits(weights(step))), `step ${step}`).toBe(true)
          expect(bits(toHost(out.params.b)).equals(bits(biases(step))), `step ${step}`).toBe(true)
          expect((yield* ckpt.readManifest(step)).dataPosition).toEqual({ step })
          out.params.w.dispose()
          out.params.b.dispose()
        }
        return { steps, latest: yield* ckpt.latestStep }
      }).pipe(
        Effect.provide(Checkpointer.layer({ directory: dir })),
        Effect.scoped,
        Effect.provide(CpuRuntime({ devices: 1 })),
      ),
    )
    // Every folder named like a step is a complete step: renames are the only way one appears or goes.
    expect(result.steps, `kill ${i}: ${left.join(" ")}`).toEqual(named)
    const latest = Option.getOrElse(result.latest, () => 0)
    expect(latest).toBeGreaterThanOrEqual(Math.max(newest, reported ?? 0))
    newest = latest
    // Opening removed what the kill left half-written.
    for (const name of readdirSync(dir)) expect(name).toMatch(/^\d+$/)
  }
  rmSync(dir, { recursive: true, force: true })
  return { newest, midWrite }
}

it("20 SIGKILLs at random moments never leave a torn checkpoint", async () => {
  // Two directories side by side, 10 kills each: a child's start (loading effect) dominates the time.
  const lanes = await Promise.all([killRepeatedly(99, 10), killRepeatedly(7, 10)])
  for (const lane of lanes) expect(lane.newest).toBeGreaterThan(5)
  // Most kills land inside a save (the child does little else), so the interesting window is hit.
  expect(lanes[0]!.midWrite + lanes[1]!.midWrite).toBeGreaterThan(4)
}, 120_000)
