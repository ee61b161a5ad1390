/**
 * Moving between [B, T, H·hd] (what the projections produce) and [B, T, H, hd] (what RoPE and
 * attention read): the same bytes, so these are views. A split of H·hd over some axes becomes a
 * split of H, which needs H divisible by their size.
 */
import type { ShardedArray } from "../shardedArray.ts"
import { entriesOf, specOf, toLayout, view } from "./layout.ts"

export const splitHeads = (x: ShardedArray, heads: number): ShardedArray => {
  const [b, t, f] = entriesOf(x) as [string[], string[], string[]]
  const parts = x.mesh.axesSize(f)
  const xs = heads % parts === 0 ? x : toLayout(x, specOf([b, t, []]))
  const fAxes = heads % parts === 0 ? f : []
  const xx = xs.partial.length ? toLayout(xs, xs.spec) : xs
  const [B, T, F] = x.shape as [number, number, number]
  return view(xx, [B, T, heads, F / heads], specOf([b, t, fAxes, []]))
}

export const mergeHeads = (x: ShardedArray): ShardedArray => {
  const [b, t, h, d] = entriesOf(x) as [string[], string[], string[], string[]]
  const xs = d.length > 0 || x.partial.length > 0 ? toLayout(x, specOf([b, t, h, []])) : x
  const [B, T, H, hd] = x.shape as [number, number, number, number]
  return view(xs, [B, T, H * hd], specOf([b, t, h]))
}
