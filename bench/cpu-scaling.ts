/**
 * The cost of the collectives on CPU virtual devices: one step of the tiny Llama (examples/tiny)
 * on the same global batch, over 1, 2 and 4 devices with data parallelism, FSDP and tensor
 * parallelism. Virtual devices share the machine's cores, so more devices add communication
 * without adding compute: the step time over the 1-device time is the price of the collectives.
 *   npx tsx bench/cpu-scaling.ts
 */
import { Effect, Layer } from "effect"
import { placeBatch } from "../src/core/models/batch.ts"
import { LlamaForCausalLM } from "../src/core/models/decoder.ts"
import { initParams } from "../src/core/models/init.ts"
import { adamw, chain, initializeOptState } from "../src/core/optim.ts"
import { type PartitionRules, rulesWithout } from "../src/core/partitionRules.ts"
import { makeTrainStep } from "../src/core/train.ts"
import { CpuRuntime, createDeviceMesh, Devices } from "../src/layers/Devices.ts"
import { Hub } from "../src/layers/Hub.ts"
import { loadModelConfig } from "../src/layers/loadModel.ts"
import { embeddedModelDir } from "../src/layers/Training.ts"
import { cpuName, printTable, writeResult } from "./report.ts"

const B = 32
const T = 64
const STEPS = 8

const measure = (shape: [number, number], rules: PartitionRules) =>
  Effect.gen(function* () {
    const { engine } = yield* Devices
    const mesh = yield* createDeviceMesh(shape)
    const model = yield* loadModelConfig(LlamaForCausalLM, embeddedModelDir)
    const params = yield* initParams(model, engine, mesh, rules, { seed: 0 })
    const opt = chain(adamw({ lr: 1e-3 }))
    const st = yield* initializeOptState(opt, params, rules, mesh)
    const ids = Int32Array.from({ length: B * T }, (_, i) => 3 + ((i * 31) % 250))
    const { batch } = yield* placeBatch(engine, mesh, {
      batchSize: B,
      length: T,
      inputIds: ids,
      positions: Int32Array.from(ids, (_, i) => i % T),
      targets: Int32Array.from(ids, (_, i) => (i % T === T - 1 ? -100 : ids[i + 1]!)),
    })
    const step = makeTrainStep(model, opt)
    for (let i = 0; i < 2; i++) (yield* step(params, st, batch)).loss.dispose()
    const times: number[] = []
    for (let i = 0; i < STEPS; i++) {
      const t0 = performance.now()
      ;(yield* step(params, st, batch)).loss.dispose()
      times.push(performance.now() - t0)
    }
    times.sort((a, b) => a - b)
    return times[Math.floor(times.length / 2)]!
  }).pipe(
    Effect.scoped,
    Effect.provide(Layer.mergeAll(CpuRuntime({ devices: shape[0] * shape[1] }), Hub.layer)),
  )

const cases: Array<[string, [number, number], PartitionRules]> = [
  ["1 device", [1, 1], LlamaForCausalLM.partitionRules],
  ["data parallel ×2", [2, 1], []],
  ["data parallel ×4", [4, 1], []],
  ["FSDP ×2", [2, 1], rulesWithout(LlamaForCausalLM.partitionRules, "model")],
  ["FSDP ×4", [4, 1], rulesWithout(LlamaForCausalLM.partitionRules, "model")],
  ["tensor parallel ×2", [1, 2], rulesWithout(LlamaForCausalLM.partitionRules, "data")],
  ["default rules 2×2", [2, 2], LlamaForCausalLM.partitionRules],
]

const rows: Array<Record<string, string | number>> = []
let base = 0
for (const [name, shape, rules] of cases) {
  const ms = await Effect.runPromise(measure(shape, rules))
  if (!base) base = ms
  rows.push({
    setup: name,
    mesh: shape.join("x"),
    "step ms": ms,
    "tokens/s": Math.round((B * T * 1000) / ms),
    "× 1 device": ms / base,
  })
}
printTable(rows)
console.log(
  `wrote ${writeResult("cpu-scaling", cpuName(), { model: "examples/tiny (0.77M)", batch: B, sequence: T, rows })}`,
)
