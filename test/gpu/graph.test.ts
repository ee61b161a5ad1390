/**
 * CUDA graphs (`npm run test:gpu`; skipped without a GPU): a captured bf16 train step of the
 * llama fixture gives the losses and parameters of op-by-op replay over changing batches (within
 * float32 rounding: embedding_bwd adds with atomics, so two runs differ in the last bits), the
 * capture succeeds (which proves the step never synchronises the host: CUDA refuses a
 * synchronisation inside a capture), and a graph launch runs its kernels again each time.
 */
import { join } from "node:path"
import { Effect, Layer, type Scope } from "effect"
import { describe, expect, it } from "vitest"
import { CudaRuntime, Devices, gpuAvailable } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { graphTrainRun, launchTwice } from "../core/graphRun.ts"
import { fixtures, relErr } from "../helpers.ts"

const gpu = gpuAvailable()
const hub = Hub.localDirectory(join(fixtures, "hf"))
const onCuda = <A, E>(e: Effect.Effect<A, E, Devices | Hub | Scope.Scope>) =>
  Effect.runPromise(e.pipe(Effect.scoped, Effect.provide(Layer.mergeAll(CudaRuntime, hub))))

const STEPS = 6

const train = (graph: boolean) =>
  onCuda(graphTrainRun({ graph, steps: STEPS, meshShape: [1, 1], computeDtype: "bfloat16" }))

describe.skipIf(!gpu)("CUDA graphs", () => {
  it("a captured bf16 train step matches op-by-op replay over changing batches", async () => {
    const plain = await train(false)
    const graphed = await train(true)
    expect(graphed.counts.error).toBeUndefined()
    expect(graphed.counts.launches).toBe(STEPS - 2)
    expect(graphed.counts.nodes[0]).toBeGreaterThan(100)
    expect(graphed.memory.graphHeld).toBeLessThan(graphed.memory.replayPeak * 1.1)
    expect(new Set(graphed.losses).size).toBe(STEPS)
    expect(relErr(graphed.losses, plain.losses)).toBeLessThan(1e-4)
    for (const [i, [name, p]] of plain.params.entries())
      expect(relErr(graphed.params[i]![1], p), name).toBeLessThan(1e-3)
  })

  it("each launch runs the captured kernels again", () =>
    onCuda(
      Effect.gen(function* () {
        const { engine } = yield* Devices
        const seen = launchTwice(engine.backend)
        expect(seen.afterCapture).toEqual([10, 20, 30, 40])
        expect(seen.once).toEqual([11, 22, 33, 44])
        expect(seen.twice).toEqual([12, 24, 36, 48])
        expect(seen.nodes).toBe(1)
      }),
    ))
})
