/**
 * Save and restore throughput for a ~200 MB tree (48 float32 arrays of 4 MiB, saved from 2×2
 * with P(data, model) and restored onto 1×4 with P(null, model), so every device reads two
 * chunks per array). Heavy on disk and memory, so it runs only with MAGIX_CKPT_BENCH=1:
 *   MAGIX_CKPT_BENCH=1 npx vitest run test/checkpoint/throughput.test.ts
 */
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Layer } from "effect"
import { expect, it } from "vitest"
import { fromHost, type ShardedArray, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { type ArrayTarget, Checkpointer } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"
import { mesh } from "../helpers.ts"

it.skipIf(!process.env.MAGIX_CKPT_BENCH)(
  "saves and restores a ~200 MB tree (MB/s printed)",
  async () => {
    const dir = mkdtempSync(join(tmpdir(), "magix-ckpt-bench-"))
    const shape = [1024, 1024]
    const arrays = 48
    const mb = (arrays * 1024 * 1024 * 4) / 1e6
    const r = await Effect.runPromise(
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const { engine } = yield* Devices
        const from = mesh([2, 2])
        const params: Record<string, ShardedArray> = {}
        for (let i = 0; i < arrays; i++)
          params[`model.layers.${i}.weight`] = yield* fromHost(
            engine,
            Float32Array.from({ length: 1024 * 1024 }, (_, j) => i + j * 1e-6),
            shape,
            "float32",
            new NamedSharding(from, P("data", "model")),
          )
        const saveOnce = (step: number) =>
          Effect.gen(function* () {
            const t0 = performance.now()
            yield* ckpt.save(step, { params })
            const t1 = performance.now()
            yield* ckpt.wait
            return { snapshot: t1 - t0, save: performance.now() - t0 }
          })
        // The first save touches fresh host memory; later ones reuse the last snapshot's.
        const first = yield* saveOnce(1)
        const second = yield* saveOnce(2)
        const restoreOnto = (sharding: NamedSharding) =>
          Effect.gen(function* () {
            const targets: Record<string, ArrayTarget> = {}
            for (const k of Object.keys(params)) targets[k] = { shape, dtype: "float32", sharding }
            const t0 = performance.now()
            const out = yield* ckpt.restore(2, { params: targets })
            const ms = performance.now() - t0
            const k = "model.layers.7.weight"
            const same = Buffer.from((toHost(out.params[k]!) as Float32Array).buffer).equals(
              Buffer.from((toHost(params[k]!) as Float32Array).buffer),
            )
            for (const a of Object.values(out.params)) a.dispose()
            return { ms, same, read: (yield* ckpt.stats).restoreBytesRead }
          })
        // The saving sharding (chunks go straight to the devices), then another mesh (assembled on the host).
        const same = yield* restoreOnto(new NamedSharding(from, P("data", "model")))
        const other = yield* restoreOnto(new NamedSharding(mesh([1, 4]), P(null, "model")))
        // Again, now that the devices' memory has been touched once (the first restore pays page faults).
        const again = yield* restoreOnto(new NamedSharding(from, P("data", "model")))
        return { first, second, same, other, again }
      }).pipe(
        Effect.provide(Checkpointer.layer({ directory: dir })),
        Effect.scoped,
        Effect.provide(Layer.mergeAll(CpuRuntime({ devices: 4 }))),
      ),
    )
    rmSync(dir, { recursive: true, force: true })
    const rate = (ms: number) => `${(mb / (ms / 1000)).toFixed(0)} MB/s`
    const show = (s: { snapshot: number; save: number }) =>
      `snapshot ${s.snapshot.toFixed(0)} ms (${rate(s.snapshot)}), on disk after ${s.save.toFixed(0)} ms (${rate(s.save)})`
    const shown = (s: { ms: number; read: number }) =>
      `${s.ms.toFixed(0)} ms (${rate(s.ms)}, ${(s.read / 1e6).toFixed(0)} MB read)`
    console.log(
      `checkpoint of ${mb.toFixed(0)} MB: first save ${show(r.first)}; second save ${show(r.second)}; ` +
        `restore onto the saving sharding ${shown(r.same)}; onto 1×4 P(null, model) ${shown(r.other)}; ` +
        `onto the saving sharding again ${shown(r.again)}`,
    )
    expect(r.same.same && r.other.same && r.again.same).toBe(true)
  },
  300_000,
)
