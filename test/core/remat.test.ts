/**
 * Activation checkpointing (ForwardOptions.remat): the same loss and gradients as keeping every
 * activation, bit for bit on the CPU backend (the recomputation runs the same ops in the same
 * order), on one device and sharded over a 2×2 mesh, with LoRA (frozen base) too; and less peak
 * device memory for the step.
 */
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { valueAndGrad } from "../../src/core/autodiff.ts"
import { parseConfig } from "../../src/core/config.ts"
import { defaultLoraRules, initLora } from "../../src/core/lora.ts"
import type { Mesh } from "../../src/core/mesh.ts"
import { placeBatch } from "../../src/core/models/batch.ts"
import { LlamaForCausalLM, type Params } from "../../src/core/models/decoder.ts"
import { initParams } from "../../src/core/models/init.ts"
import { adamw, chain, initializeOptState } from "../../src/core/optim.ts"
import { shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { makeTrainStep } from "../../src/core/train.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { mesh, runCpu } from "../helpers.ts"
import { makeBatch } from "../parallel/equivalenceRun.ts"

/** The llama fixture (test/fixtures/hf/llama) placed on `m` with the default rules. */
const fixtureLlama = (m: Mesh) => loadModelHub(LlamaForCausalLM, "llama", LlamaForCausalLM.partitionRules, m)

const gradsOf = (shape: [number, number], remat: boolean) =>
  runCpu(
    shape[0] * shape[1],
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh(shape)
      const { model, params } = yield* fixtureLlama(m)
      const { batch } = yield* placeBatch(engine, m, makeBatch(model.config.vocabSize))
      const { value, grads } = valueAndGrad((p: Params) => model.loss(p, batch, { remat }))(params)
      return {
        loss: shardToHost(value, 0)[0],
        grads: Object.fromEntries(
          Object.entries(grads).map(([k, g]) => [k, Array.from(toHost(g) as Float32Array)]),
        ),
      }
    }),
  )

describe("activation checkpointing", () => {
  it.each([[[1, 1]], [[2, 2]]] as Array<[[number, number]]>)(
    "gives the same loss and gradients bit for bit on mesh %j",
    async (shape) => {
      const kept = await gradsOf(shape, false)
      const again = await gradsOf(shape, true)
      expect(again.loss).toBe(kept.loss)
      expect(Object.keys(again.grads).sort()).toEqual(Object.keys(kept.grads).sort())
      for (const [name, g] of Object.entries(kept.grads)) expect(again.grads[name], name).toEqual(g)
    },
  )

  it("with LoRA: only the adapter gets gradients, the same ones", async () => {
    const run = (remat: boolean) =>
      runCpu(
        1,
        Effect.gen(function* () {
          const { engine } = yield* Devices
          const m = mesh([1, 1])
          const { model, params } = yield* fixtureLlama(m)
          const lora = yield* initLora(
            engine,
            m,
            model.parameterShapes,
            LlamaForCausalLM.partitionRules,
            { rules: defaultLoraRules(4), alpha: 8 },
            3,
          )
          const { batch } = yield* placeBatch(engine, m, makeBatch(model.config.vocabSize))
          const { grads } = valueAndGrad((p: Params) =>
            model.loss(params, batch, { remat, lora: { params: p, alpha: 8 } }),
          )(lora)
          return Object.fromEntries(
            Object.entries(grads).map(([k, g]) => [k, Array.from(toHost(g) as Float32Array)]),
          )
        }),
      )
    const kept = await run(false)
    const again = await run(true)
    expect(Object.keys(kept).length).toBeGreaterThan(0)
    // B starts at zero (so A's gradient is zero); B's must not be.
    expect(Object.entries(kept).some(([k, g]) => k.endsWith("lora_B") && g.some((x) => x !== 0))).toBe(true)
    for (const [name, g] of Object.entries(kept)) expect(again[name], name).toEqual(g)
  })

  it("a jitted train step with it (traced, then replayed) updates the parameters exactly alike", async () => {
    const train = (remat: boolean) =>
      runCpu(
        4,
        Effect.gen(function* () {
          const { engine } = yield* Devices
          const m = mesh([2, 2])
          const rules = LlamaForCausalLM.partitionRules
          const { model, params } = yield* fixtureLlama(m)
          const opt = chain(adamw({ lr: 1e-2 }))
          const st = yield* initializeOptState(opt, params, rules, m)
          const step = makeTrainStep(model, opt, { remat })
          const { batch } = yield* placeBatch(engine, m, makeBatch(model.config.vocabSize))
          const losses: number[] = []
          for (let s = 0; s < 3; s++) {
            const out = yield* step(params, st, batch)
            losses.push(Number(shardToHost(out.loss, 0)[0]))
            out.loss.dispose()
          }
          step.dispose()
          return {
            losses,
            params: Object.fromEntries(
              Object.entries(params).map(([k, a]) => [k, Array.from(toHost(a) as Float32Array)]),
            ),
          }
        }),
      )
    const kept = await train(false)
    const again = await train(true)
    expect(again.losses).toEqual(kept.losses)
    expect(kept.losses[2]).toBeLessThan(kept.losses[0]!)
    for (const [name, p] of Object.entries(kept.params)) expect(again.params[name], name).toEqual(p)
  })

  it("lowers the step's peak device memory when activations dominate", async () => {
    const peakOf = (remat: boolean) =>
      runCpu(
        1,
        Effect.gen(function* () {
          const devices = yield* Devices
          const m = mesh([1, 1])
          const config = yield* parseConfig({
            model_type: "llama",
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 8,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 512,
            rms_norm_eps: 1e-5,
          })
          const model = new LlamaForCausalLM(config)
          const params = yield* initParams(model, devices.engine, m, LlamaForCausalLM.partitionRules, {
            seed: 0,
          })
          const T = 256
          const ids = Int32Array.from({ length: 8 * T }, (_, i) => 3 + ((i * 7) % 250))
          const { batch } = yield* placeBatch(devices.engine, m, {
            batchSize: 8,
            length: T,
            inputIds: ids,
            positions: Int32Array.from(ids, (_, i) => i % T),
            targets: Int32Array.from(ids, (_, i) => (i % T === T - 1 ? -100 : ids[i + 1]!)),
          })
          const before = (yield* devices.memory(0)).inUse
          yield* devices.resetPeak(0)
          const { value, grads } = valueAndGrad((p: Params) => model.loss(p, batch, { remat }))(params)
          const peak = (yield* devices.memory(0)).peak - before
          value.dispose()
          for (const g of Object.values(grads)) g.dispose()
          return peak
        }),
      )
    const kept = await peakOf(false)
    const again = await peakOf(true)
    // 8 layers of [8, 256, 64] activations: a dozen kept per layer without remat, one with it.
    expect(again).toBeLessThan(kept * 0.6)
  })
})
