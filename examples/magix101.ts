/**
 * Magix 101: the five steps of the original Magix, on four virtual CPU devices (swap in
 * Magix.CudaRuntime for GPUs). Run with `npx tsx examples/magix101.ts`; test/examples.test.ts
 * runs it too, so this file and the README stay true.
 */
import { Effect, Layer } from "effect"
import * as Magix from "../src/index.ts"
import { LlamaForCausalLM } from "../src/core/models/index.ts"

const program = Effect.gen(function* () {
  // 1-2. the devices in a named grid: 2-way data parallel × 2-way tensor parallel
  const mesh = yield* Magix.createDeviceMesh([2, 2], ["data", "model"])

  // 3. a Hugging Face model (Hub id or directory); every device receives only its own shard
  const { model, params } = yield* Magix.loadModelHub(
    LlamaForCausalLM,
    "test/fixtures/hf/llama",
    LlamaForCausalLM.partitionRules,
    mesh,
  )

  // 4. the optimizer, and its state born sharded like the parameters
  const optimizer = Magix.optim.chain(
    Magix.optim.clipByGlobalNorm(1.0),
    Magix.optim.adamw({
      lr: Magix.optim.warmupCosine({ peak: 1e-3, warmup: 2, total: 10 }),
      weightDecay: 1e-3,
      mask: Magix.optim.decayMask,
    }),
    Magix.optim.skipNonFinite({ maxConsecutive: 10 }),
  )
  const optState = yield* Magix.initializeOptState(optimizer, params, LlamaForCausalLM.partitionRules, mesh)

  // 5. a jitted step: traced once, replayed after (from the third call as one graph: a CUDA graph
  //    on GPUs); parameters and moments updated in place
  const trainStep = Magix.jit(
    (p: typeof params, s: typeof optState, batch: Magix.TokenBatch) => {
      const { value, grads } = Magix.valueAndGrad((q: typeof params) => model.loss(q, batch))(p)
      Magix.optim.applyUpdates(optimizer, p, grads, s)
      return { loss: value }
    },
    { donate: ["p", "s"], graph: true },
  )

  // a batch: token ids, positions and next-token targets (-100 is ignored), split over `data`
  const { engine } = yield* Magix.Devices
  const ids = Int32Array.from({ length: 4 * 8 }, (_, i) => 3 + ((i * 7) % 250))
  const targets = Int32Array.from(ids, (_, i) => (i % 8 === 7 ? -100 : ids[i + 1]!))
  const positions = Int32Array.from(ids, (_, i) => i % 8)
  const { batch } = yield* Magix.placeBatch(engine, mesh, { batchSize: 4, length: 8, inputIds: ids, positions, targets })

  const losses: number[] = []
  for (let step = 0; step < 5; step++) {
    const { loss } = yield* trainStep(params, optState, batch)
    losses.push(Number(Magix.toHost(loss)[0]))
  }
  yield* Effect.log(`loss ${losses.map((l) => l.toFixed(3)).join(" → ")} on ${mesh}`)
  return losses
})

export const magix101 = program.pipe(Effect.scoped, Effect.provide(Layer.mergeAll(Magix.CpuRuntime({ devices: 4 }), Magix.Hub.layer)))

if (import.meta.url === `file://${process.argv[1]}`) Effect.runPromise(magix101)
