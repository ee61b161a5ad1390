/**
 * It learns: a tiny Llama, fresh from its config, is trained on the CPU to copy random four-symbol
 * strings (BOS a b c d SEP → a b c d EOS) until the loss on the copied tokens is under 0.05, then
 * greedy generation must copy strings it never saw in training.
 */
import { Effect } from "effect"
import { expect, it } from "vitest"
import { parseConfig } from "../../src/core/config.ts"
import { generate } from "../../src/core/generate.ts"
import { placeBatch } from "../../src/core/models/batch.ts"
import { LlamaForCausalLM } from "../../src/core/models/decoder.ts"
import { initParams } from "../../src/core/models/init.ts"
import { adamw, chain, clipByGlobalNorm, initializeOptState, warmupCosine } from "../../src/core/optim.ts"
import { shardToHost } from "../../src/core/shardedArray.ts"
import { makeTrainStep } from "../../src/core/train.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { mesh, runCpu } from "../helpers.ts"

const PAD = 0
const BOS = 1
const EOS = 2
const SEP = 3
const SYMBOLS = 12 // ids 4..15
const L = 4
const T = 2 * L + 3 // BOS, L symbols, SEP, L symbols, EOS

let state = 2024
const rand = () => {
  state = (Math.imul(state, 1664525) + 1013904223) >>> 0
  return state / 2 ** 32
}
const randomString = () => Array.from({ length: L }, () => 4 + Math.floor(rand() * SYMBOLS))

const LOSS_THRESHOLD = 0.05
const MAX_STEPS = 400

it("a tiny Llama learns to copy and solves held-out prompts", async () => {
  const result = await runCpu(
    1,
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh([1, 1])
      const config = yield* parseConfig({
        model_type: "llama",
        vocab_size: 16,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
      })
      const model = new LlamaForCausalLM(config)
      const params = yield* initParams(model, engine, m, LlamaForCausalLM.partitionRules, { seed: 1 })
      const optimizer = chain(
        clipByGlobalNorm(1),
        adamw({ lr: warmupCosine({ peak: 3e-3, warmup: 20, total: MAX_STEPS }), weightDecay: 0 }),
      )
      const optState = yield* initializeOptState(optimizer, params, LlamaForCausalLM.partitionRules, m)
      const step = makeTrainStep(model, optimizer)
      const seen = new Set<string>()
      const B = 32
      let loss = Number.POSITIVE_INFINITY
      let steps = 0
      while (steps < MAX_STEPS && loss > LOSS_THRESHOLD) {
        const inputIds = new Int32Array(B * T)
        const targets = new Int32Array(B * T).fill(-100)
        const positions = new Int32Array(B * T)
        for (let b = 0; b < B; b++) {
          const s = randomString()
          seen.add(s.join(","))
          const row = [BOS, ...s, SEP, ...s, EOS]
          inputIds.set(row, b * T)
          for (let t = 0; t < T; t++) positions[b * T + t] = t
          // Only the copy is learnable: the targets after SEP.
          for (let t = L + 1; t < T - 1; t++) targets[b * T + t] = row[t + 1]!
        }
        const { batch } = yield* placeBatch(engine, m, {
          batchSize: B,
          length: T,
          inputIds,
          positions,
          targets,
        })
        const out = yield* step(params, optState, batch)
        loss = Number(shardToHost(out.loss, 0)[0])
        out.loss.dispose()
        steps++
      }
      // Held-out prompts: strings never drawn in training.
      const prompts: number[][] = []
      while (prompts.length < 16) {
        const s = randomString()
        if (!seen.has(s.join(","))) prompts.push(s)
      }
      const P = L + 2
      const inputIds = new Int32Array(prompts.length * P)
      prompts.forEach((s, b) => inputIds.set([BOS, ...s, SEP], b * P))
      const seqs = yield* generate(
        model,
        params,
        engine,
        m,
        {
          batchSize: prompts.length,
          length: P,
          inputIds,
          attentionMask: new Uint8Array(prompts.length * P).fill(1),
        },
        { maxNewTokens: L + 1, eosTokenIds: [EOS], padTokenId: PAD },
      )
      const solved = seqs.filter(
        (seq, b) => seq.slice(P).join(",") === [...prompts[b]!, EOS].join(","),
      ).length
      return { loss, steps, solved, total: prompts.length }
    }),
  )
  expect(result.loss).toBeLessThan(LOSS_THRESHOLD)
  expect(result.solved).toBe(result.total)
}, 180_000)
