import { Effect } from "effect"
import { expect, it } from "vitest"
import { normalAt, streamKey } from "../../src/core/random.ts"
import { allocateArray, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"
import { mesh } from "../helpers.ts"

it("the native random_normal draws the TypeScript counter-based numbers, block by block, on any sharding", async () => {
  const key = streamKey(42, 7)
  const shape = [12, 8]
  for (const spec of [P(), P("data"), P("data", "model"), P(null, ["model", "data"])]) {
    const got = await Effect.runPromise(
      Effect.gen(function* () {
        const { engine } = yield* Devices
        const m = mesh([2, 2])
        const s = new NamedSharding(m, spec)
        const arr = allocateArray(engine, shape, "float32", s)
        for (let p = 0; p < 4; p++) {
          const sl = s.slice(p, shape)
          engine.backend.exec(
            "random_normal",
            [arr.buffer(p)],
            [0, key, 0.5, 2, ...shape, ...sl.offsets, ...sl.shape],
          )
        }
        return Array.from(toHost(arr) as Float32Array)
      }).pipe(Effect.provide(CpuRuntime({ devices: 4 }))),
    )
    const expected = Array.from({ length: 96 }, (_, i) => Math.fround(0.5 * normalAt(key, i)))
    expect(got).toEqual(expected)
  }
  // Roughly standard normal.
  const xs = Array.from({ length: 20000 }, (_, i) => normalAt(key, i))
  const mean = xs.reduce((a, b) => a + b, 0) / xs.length
  const variance = xs.reduce((a, b) => a + (b - mean) ** 2, 0) / xs.length
  expect(Math.abs(mean)).toBeLessThan(0.03)
  expect(Math.abs(variance - 1)).toBeLessThan(0.05)
})
