/**
 * Scaled dot-product attention, causal or not, grouped-query, with an optional sliding window
 * and key padding mask, flash-style in the native op (the score matrix is never held whole).
 * q [B, T, Hq, hd], k and v [B, S, Hkv, hd]. Batch and heads may be split over mesh axes (heads
 * the same way on q, k and v); sequence and head dimension are gathered where split.
 */
import { record } from "../autodiff.ts"
import { dtypeCode } from "../dtype.ts"
import type { ShardedArray } from "../shardedArray.ts"
import { cotangentIn, entriesOf, specOf, toLayout } from "./layout.ts"
import { newArray, statsDtype } from "./local.ts"

export interface AttentionOptions {
  readonly causal: boolean
  /** Keys at distance ≥ window from the query are hidden (Mistral's sliding window); 0 for none. */
  readonly window?: number
  /** Softmax scale; 1/√hd by default. */
  readonly scale?: number
  /** [B, S] uint8, 1 where a key may be attended (left padding is 0). */
  readonly keyMask?: ShardedArray
  /** Position of the first query in the key sequence (decoding with a cache). */
  readonly queryOffset?: number
  /** Keys in use when k and v are a longer cache (the first keyLength rows of dimension 1). */
  readonly keyLength?: number
}

export const attention = (
  q: ShardedArray,
  k: ShardedArray,
  v: ShardedArray,
  options: AttentionOptions,
): ShardedArray => {
  const [b, , h] = entriesOf(q) as [string[], string[], string[]]
  const spec = specOf([b, [], h, []])
  const qs = toLayout(q, spec)
  const ks = toLayout(k, spec)
  const vs = toLayout(v, spec)
  const mesh = q.mesh
  const parts = mesh.axesSize(h)
  const [B, T, Hq, hd] = q.shape as [number, number, number, number]
  const sMax = k.shape[1]!
  const S = options.keyLength ?? sMax
  const Hkv = k.shape[2]!
  if (Hq % parts !== 0 || Hkv % parts !== 0 || Hq % Hkv !== 0)
    throw new Error(
      `attention: ${Hq} query and ${Hkv} KV heads cannot be split into ${parts} parts over (${h.join(", ")})`,
    )
  const mask = options.keyMask
    ? options.keyMask.spec.padTo(2).equals(specOf([b, []]))
      ? options.keyMask
      : q.engine.collectives.relayout(options.keyMask, specOf([b, []]))
    : undefined
  const Bl = qs.localShape[0]!
  const scale = options.scale ?? 1 / Math.sqrt(hd)
  const args = [
    dtypeCode(q.dtype),
    Bl,
    T,
    S,
    Hq / parts,
    Hkv / parts,
    hd,
    scale,
    options.causal ? 1 : 0,
    options.window ?? 0,
    options.queryOffset ?? 0,
    mask ? 1 : 0,
    sMax,
  ]
  const o = newArray(qs, qs.shape, spec)
  const lse = newArray(qs, [B, Hq, T], specOf([b, h, []]), [], statsDtype(q.dtype))
  const withMask = (bufs: number[], p: number) => (mask ? [...bufs, mask.buffer(p)] : bufs)
  for (let p = 0; p < mesh.size; p++)
    q.engine.backend.exec(
      "attention_fwd",
      withMask([qs.buffer(p), ks.buffer(p), vs.buffer(p), o.buffer(p), lse.buffer(p)], p),
      args,
    )
  record(q.engine, {
    name: "attention",
    inputs: [qs, ks, vs, lse],
    outputs: [o],
    backward: ([ct]) => {
      if (!ct) return [undefined, undefined, undefined, undefined]
      const dO = cotangentIn(ct, o)
      const dq = newArray(qs, qs.shape, spec)
      const dk = newArray(ks, ks.shape, spec)
      const dv = newArray(vs, vs.shape, spec)
      for (let p = 0; p < mesh.size; p++)
        q.engine.backend.exec(
          "attention_bwd",
          withMask(
            [
              qs.buffer(p),
              ks.buffer(p),
              vs.buffer(p),
              o.buffer(p),
              lse.buffer(p),
              dO.buffer(p),
              dq.buffer(p),
              dk.buffer(p),
              dv.buffer(p),
            ],
            p,
          ),
          args,
        )
      if (dO !== ct) dO.dispose()
      return [dq, dk, dv, undefined]
    },
  })
  return o
}
