/**
 * Generation: batched greedy decoding with left padding and a KV cache gives, for every prompt,
 * what transformers' generate() gives for that prompt alone (test/fixtures/hf/<family>/generation.json);
 * cached decoding equals recomputing the whole sequence at every step (greedy and sampled).
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { argmax, generate, type PromptBatch, sampleToken } from "../../src/core/generate.ts"
import { modelClassFor } from "../../src/core/models/decoder.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { families, fixtures, mesh, runCpu } from "../helpers.ts"

interface Reference {
  prompts: number[][]
  max_new_tokens: number
  pad_token_id: number
  eos_token_id: number
  sequences: number[][]
}

const leftPad = (prompts: number[][], pad: number): PromptBatch => {
  const length = Math.max(...prompts.map((p) => p.length))
  const inputIds = new Int32Array(prompts.length * length).fill(pad)
  const attentionMask = new Uint8Array(prompts.length * length)
  prompts.forEach((p, b) => {
    inputIds.set(p, b * length + length - p.length)
    attentionMask.fill(1, b * length + length - p.length, (b + 1) * length)
  })
  return { batchSize: prompts.length, length, inputIds, attentionMask }
}

const modelTypeOf = (family: string) =>
  (family === "llama3" ? "llama" : family) as "llama" | "mistral" | "gemma"

const run = (
  family: string,
  shape: [number, number],
  f: (g: (batch: PromptBatch, o: Parameters<typeof generate>[5]) => number[][]) => unknown,
) =>
  runCpu(
    shape[0] * shape[1],
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh(shape)
      const Model = modelClassFor(modelTypeOf(family))
      const { model, params } = yield* loadModelHub(Model, family, Model.partitionRules, m)
      return f((batch, o) => Effect.runSync(generate(model, params, engine, m, batch, o)))
    }),
  )

describe.each(families)("%s generation", (family) => {
  const ref = JSON.parse(readFileSync(join(fixtures, "hf", family, "generation.json"), "utf8")) as Reference

  it("batched left-padded greedy decoding gives transformers' tokens for each prompt", async () => {
    const seqs = (await run(family, [1, 1], (g) =>
      g(leftPad(ref.prompts, ref.pad_token_id), {
        maxNewTokens: ref.max_new_tokens,
        eosTokenIds: [ref.eos_token_id],
        padTokenId: ref.pad_token_id,
      }),
    )) as number[][]
    const P = Math.max(...ref.prompts.map((p) => p.length))
    seqs.forEach((seq, b) => {
      const prompt = ref.prompts[b]!
      const ours = seq.slice(P - prompt.length)
      const theirs = ref.sequences[b]!
      expect(ours.slice(0, theirs.length)).toEqual(theirs)
      // After a stop token a finished row only pads.
      for (const t of ours.slice(theirs.length)) expect(t).toBe(ref.pad_token_id)
    })
  })
})

describe("KV cache", () => {
  it.each([
    ["greedy", { sample: false }],
    ["sampled (temperature, top-k, top-p)", { sample: true, temperature: 0.8, topK: 50, topP: 0.9, seed: 3 }],
  ] as const)("cached decoding equals recomputation, %s, tensor parallel over 2 devices", async (_, o) => {
    const ref = JSON.parse(
      readFileSync(join(fixtures, "hf", "mistral", "generation.json"), "utf8"),
    ) as Reference
    const batch = leftPad([...ref.prompts, [5, 9, 200]], ref.pad_token_id)
    const options = { ...o, maxNewTokens: 14, eosTokenIds: [ref.eos_token_id], padTokenId: ref.pad_token_id }
    const [cached, recomputed] = (await run("mistral", [1, 2], (g) => [
      g(batch, options),
      g(batch, { ...options, noCache: true }),
    ])) as number[][][]
    expect(cached).toEqual(recomputed)
    expect(cached![0]!.length).toBeGreaterThan(batch.length)
  })
})

describe("sampling", () => {
  const logits = Float32Array.from([0.1, 2.0, -1, 1.9, 0.5])
  it("greedy takes the first largest logit", () => {
    expect(argmax(Float32Array.from([1, 3, 3, 0]))).toBe(1)
  })
  it("top-k 1 and a tiny top-p are greedy; temperature spreads the choice", () => {
    const base = { eosTokenIds: [], padTokenId: 0 }
    for (const u of [0.01, 0.5, 0.99]) {
      expect(sampleToken(logits, { ...base, topK: 1 }, u)).toBe(1)
      expect(sampleToken(logits, { ...base, topP: 1e-6 }, u)).toBe(1)
    }
    const counts = new Map<number, number>()
    for (let i = 0; i < 1000; i++) {
      const t = sampleToken(logits, { ...base, temperature: 1, topK: 2 }, (i + 0.5) / 1000)
      counts.set(t, (counts.get(t) ?? 0) + 1)
    }
    // Only the two best survive top-k; their odds are e^2.0 : e^1.9.
    expect([...counts.keys()].sort()).toEqual([1, 3])
    expect(counts.get(1)! / 1000).toBeCloseTo(Math.exp(2) / (Math.exp(2) + Math.exp(1.9)), 2)
  })
})
