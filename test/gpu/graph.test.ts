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
import { placeBatch } from "../../src/core/models/batch.ts"
import { LlamaForCausalLM } from "../../src/core/models/decoder.ts"
import { adamw, chain, clipByGlobalNorm, initializeOptState } from "../../src/core/optim.ts"
import { shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { makeTrainStep } from "../../src/core/train.ts"
import { CudaRuntime, Devices, gpuAvailable } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { fixtures, mesh, relErr } from "../helpers.ts"
import { makeBatch } from "../parallel/equivalenceRun.ts"

const gpu = gpuAvailable()
const hub = Hub.localDirectory(join(fixtures, "hf"))
const onCuda = <A, E>(e: Effect.Effect<A, E, Devices | Hub | Scope.Scope>) =>
  Effect.runPromise(e.pipe(Effect.scoped, Effect.provide(Layer.mergeAll(CudaRuntime, hub))))

const STEPS = 6

const train = (graph: boolean) =>
  onCuda(
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh([1, 1])
      const { model, params } = yield* loadModelHub(LlamaForCausalLM, "llama", LlamaForCausalLM.partitionRules, m)
      model.computeDtype = "bfloat16"
      const opt = chain(clipByGlobalNorm(1), adamw({ lr: 1e-2 }))
      const st = yield* initializeOptState(opt, params, LlamaForCausalLM.partitionRules, m)
      const step = makeTrainStep(model, opt, { graph })
      const host = makeBatch(model.config.vocabSize)
      const losses: number[] = []
      for (let s = 0; s < STEPS; s++) {
        const ids = host.inputIds.map((t, i) => (t === 0 ? 0 : 3 + ((t + 7 * s + i) % 200)))
        const { batch } = yield* placeBatch(engine, m, { ...host, inputIds: ids })
        const out = yield* step(params, st, batch)
        losses.push(Number(shardToHost(out.loss, 0)[0]))
      }
      const seen = {
        losses,
        launches: step.graphLaunches,
        nodes: step.graphNodes,
        error: step.graphError === undefined ? undefined : String(step.graphError),
        params: Object.entries(params).map(([k, a]) => [k, toHost(a) as Float32Array] as const),
      }
      step.dispose()
      return seen
    }),
  )

describe.skipIf(!gpu)("CUDA graphs", () => {
  it("a captured bf16 train step matches op-by-op replay over changing batches", async () => {
    const plain = await train(false)
    const graphed = await train(true)
    expect(graphed.error).toBeUndefined()
    expect(graphed.launches).toBe(STEPS - 2)
    expect(graphed.nodes[0]).toBeGreaterThan(100)
    expect(new Set(graphed.losses).size).toBe(STEPS)
    expect(relErr(graphed.losses, plain.losses)).toBeLessThan(1e-4)
    for (const [i, [name, p]] of plain.params.entries())
      expect(relErr(graphed.params[i]![1], p), name).toBeLessThan(1e-3)
  })

  it("each launch runs the captured kernels again", () =>
    onCuda(
      Effect.gen(function* () {
        const { engine } = yield* Devices
        const b = engine.backend
        const g = b.graphs!
        const x = b.alloc(0, 16)
        const y = b.alloc(0, 16)
        b.write(x, 0, new Float32Array([1, 2, 3, 4]))
        b.write(y, 0, new Float32Array([10, 20, 30, 40]))
        g.begin()
        b.exec("axpby", [x, y], [0, 4, 1, 1])
        const id = g.end()
        const read = () => Array.from(new Float32Array(b.read(y, 0, 16).slice().buffer))
        const captured = read()
        g.launch(id)
        g.launch(id)
        const twice = read()
        expect(g.nodes(id)).toBe(1)
        g.destroy(id)
        b.free(x)
        b.free(y)
        expect(captured).toEqual([10, 20, 30, 40])
        expect(twice).toEqual([12, 24, 36, 48])
      }),
    ))
})
