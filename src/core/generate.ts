/**
 * Autoregressive generation with a KV cache, batched with left padding, as transformers'
 * generate(): greedy unless sampling (temperature, then top-k, then top-p), a finished row emits
 * the pad token, and generation stops when every row has produced a stop token or the length
 * limit is reached. Logits of the last position only are read back to the host each step.
 */
import { Effect } from "effect"
import { boxArgs } from "./backend.ts"
import { type DType, itemSize } from "./dtype.ts"
import type { Engine } from "./engine.ts"
import type { Mesh } from "./mesh.ts"
import { batchAxes, type CausalLM, disposeCache, type KVCache, type Params } from "./models/decoder.ts"
import { newArray } from "./ops/local.ts"
import { streamKey, uniformAt } from "./random.ts"
import { fromHost, type ShardedArray, toHost } from "./shardedArray.ts"
import { NamedSharding, PartitionSpec } from "./sharding.ts"

export interface GenerateOptions {
  /** Prompt plus continuation, as transformers' max_length. */
  readonly maxLength?: number
  /** Or a number of new tokens. */
  readonly maxNewTokens?: number
  readonly sample?: boolean
  readonly temperature?: number
  readonly topK?: number
  readonly topP?: number
  readonly seed?: number
  readonly eosTokenIds: ReadonlyArray<number>
  readonly padTokenId: number
  /** Recompute the whole sequence every step instead of using the cache (for checking). */
  readonly noCache?: boolean
}

/** Left-padded prompts: ids and mask [B, P] row-major. */
export interface PromptBatch {
  readonly batchSize: number
  readonly length: number
  readonly inputIds: Int32Array
  readonly attentionMask: Uint8Array
}

/** The index of the largest logit (the first on ties, as torch.argmax). */
export const argmax = (row: Float32Array | Float64Array): number => {
  let best = 0
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i
  return best
}

/** Samples one token from logits with temperature, top-k and top-p filtering, using u ∈ (0, 1). */
export const sampleToken = (row: Float32Array | Float64Array, o: GenerateOptions, u: number): number => {
  const t = o.temperature ?? 1
  const idx = Array.from(row.keys()).sort((a, b) => row[b]! - row[a]! || a - b)
  let keep = idx.length
  if (o.topK && o.topK > 0) keep = Math.min(keep, o.topK)
  const max = row[idx[0]!]! / t
  const probs = idx.slice(0, keep).map((i) => Math.exp(row[i]! / t - max))
  let total = probs.reduce((a, b) => a + b, 0)
  if (o.topP !== undefined && o.topP < 1) {
    // The smallest prefix whose mass reaches topP (always at least one token).
    let acc = 0
    let n = 0
    while (n < probs.length) {
      acc += probs[n]! / total
      n++
      if (acc >= o.topP) break
    }
    probs.length = n
    total = probs.reduce((a, b) => a + b, 0)
  }
  let r = u * total
  for (let i = 0; i < probs.length; i++) {
    r -= probs[i]!
    if (r <= 0) return idx[i]!
  }
  return idx[probs.length - 1]!
}

/** Positions of left-padded rows: count of real tokens before, 0 on padding. */
export const leftPaddedPositions = (mask: Uint8Array, batch: number, length: number): Int32Array => {
  const pos = new Int32Array(batch * length)
  for (let b = 0; b < batch; b++) {
    let seen = 0
    for (let t = 0; t < length; t++) {
      const m = mask[b * length + t]!
      pos[b * length + t] = m ? seen : 0
      seen += m
    }
  }
  return pos
}

/** Hidden states of the last position: [B, T, D] → [B, 1, D]. */
const lastPosition = (x: ShardedArray): ShardedArray => {
  const [B, T, D] = x.shape as [number, number, number]
  const out = newArray(x, [B, 1, D], x.spec)
  const local = x.localShape
  const outLocal = out.localShape
  for (let p = 0; p < x.mesh.size; p++)
    x.engine.backend.exec(
      "copy_box",
      [x.buffer(p), out.buffer(p)],
      [itemSize(x.dtype), ...boxArgs(local, [0, T - 1, 0], outLocal, [0, 0, 0], outLocal)],
    )
  return out
}

/**
 * Generates continuations of left-padded prompts; returns every row's prompt (with its padding)
 * followed by the generated tokens, as transformers' `sequences`.
 */
export const generate = (
  model: CausalLM,
  params: Params,
  engine: Engine,
  mesh: Mesh,
  prompts: PromptBatch,
  options: GenerateOptions,
) =>
  Effect.sync(() => {
    const { batchSize: B, length: P } = prompts
    const maxLength = options.maxLength ?? P + (options.maxNewTokens ?? 20)
    const rowSpec = new NamedSharding(mesh, new PartitionSpec([batchAxes(mesh), []]))
    const place = (data: ArrayBufferView, shape: number[], t: DType) =>
      Effect.runSync(fromHost(engine, data, shape, t, rowSpec))
    const seqs: number[][] = Array.from({ length: B }, (_, b) =>
      Array.from(prompts.inputIds.subarray(b * P, (b + 1) * P)),
    )
    const mask = new Uint8Array(B * maxLength)
    for (let b = 0; b < B; b++) mask.set(prompts.attentionMask.subarray(b * P, (b + 1) * P), b * maxLength)
    const realCount = Array.from({ length: B }, (_, b) =>
      prompts.attentionMask.subarray(b * P, (b + 1) * P).reduce((a, m) => a + m, 0),
    )
    const finished = new Array<boolean>(B).fill(false)
    const key = streamKey(options.seed ?? 0, 0x6e6e)
    const cache: KVCache | undefined = options.noCache
      ? undefined
      : {
          maxLength,
          length: 0,
          keyMask: engine.untracked(() => place(mask, [B, maxLength], "uint8")),
          layers: [],
        }
    try {
      let step = 0
      for (let len = P; len < maxLength && !finished.every((f) => f); len++, step++) {
        const logits = engine.tidy(() => {
          let ids: Int32Array
          let pos: Int32Array
          let T: number
          if (cache && step > 0) {
            T = 1
            ids = Int32Array.from(seqs.map((s) => s[len - 1]!))
            pos = Int32Array.from(realCount.map((c) => c - 1))
          } else {
            T = len
            ids = new Int32Array(B * T)
            for (let b = 0; b < B; b++) ids.set(seqs[b]!.slice(0, T), b * T)
            const m = new Uint8Array(B * T)
            for (let b = 0; b < B; b++) m.set(mask.subarray(b * maxLength, b * maxLength + T), b * T)
            pos = leftPaddedPositions(m, B, T)
          }
          const inputs = {
            inputIds: place(ids, [B, T], "int32"),
            positions: place(pos, [B, T], "int32"),
            ...(cache
              ? {}
              : {
                  keyMask: place(
                    Uint8Array.from(
                      { length: B * T },
                      (_, i) => mask[Math.floor(i / T) * maxLength + (i % T)]!,
                    ),
                    [B, T],
                    "uint8",
                  ),
                }),
          }
          if (cache && step > 0) {
            // The generated tokens' keys become visible (the cache mask was built for the prompt).
            for (let p = 0; p < mesh.size; p++) {
              const sl = cache.keyMask.sharding.slice(p, cache.keyMask.shape)
              const block = mask.subarray(
                sl.offsets[0]! * maxLength,
                (sl.offsets[0]! + sl.shape[0]!) * maxLength,
              )
              engine.backend.write(cache.keyMask.buffer(p), 0, block)
            }
          }
          const hidden = model.forward(params, inputs, cache ? { cache } : {})
          const last = lastPosition(hidden)
          return toHost(model.logits(params, last))
        })
        const V = logits.length / B
        for (let b = 0; b < B; b++) {
          let token: number
          if (finished[b]) token = options.padTokenId
          else {
            const row = (logits as Float32Array).subarray(b * V, (b + 1) * V)
            token = options.sample ? sampleToken(row, options, uniformAt(key, step * B + b)) : argmax(row)
            if (options.eosTokenIds.includes(token)) finished[b] = true
          }
          seqs[b]!.push(token)
          mask[b * maxLength + len] = 1
          realCount[b]! += 1
        }
      }
    } finally {
      if (cache) disposeCache(cache)
    }
    return seqs
  })
