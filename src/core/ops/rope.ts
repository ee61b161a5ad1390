/**
 * Rotary position embedding on x [B, T, H, hd] with positions [B, T] (int32), in the rotate-half
 * convention of Hugging Face. The inverse frequencies (with any rope scaling already applied)
 * come as a replicated [hd/2] array. Heads and batch may be split; hd may not.
 */
import { record } from "../autodiff.ts"
import { dtypeCode } from "../dtype.ts"
import { numel } from "../shape.ts"
import type { ShardedArray } from "../shardedArray.ts"
import { cotangentIn, entriesOf, specOf, toLayout } from "./layout.ts"
import { newArray } from "./local.ts"

const apply = (
  x: ShardedArray,
  positions: ShardedArray,
  invFreq: ShardedArray,
  out: ShardedArray,
  sign: 1 | -1,
  scaling: number,
) => {
  const [, , H, hd] = x.localShape as [number, number, number, number]
  const N = numel(x.localShape.slice(0, 2))
  for (let p = 0; p < x.mesh.size; p++)
    x.engine.backend.exec(
      "rope",
      [x.buffer(p), positions.buffer(p), invFreq.buffer(p), out.buffer(p)],
      [dtypeCode(x.dtype), N, H, hd, sign, scaling],
    )
}

export const rope = (
  x: ShardedArray,
  positions: ShardedArray,
  invFreq: ShardedArray,
  scaling = 1,
): ShardedArray => {
  const [b, t, h] = entriesOf(x) as [string[], string[], string[]]
  const xs = toLayout(x, specOf([b, t, h, []]))
  const pos = positions.spec.padTo(2).equals(specOf([b, t]))
    ? positions
    : x.engine.collectives.relayout(positions, specOf([b, t]))
  const y = newArray(xs, xs.shape, xs.spec)
  apply(xs, pos, invFreq, y, 1, scaling)
  record(x.engine, {
    name: "rope",
    inputs: [xs],
    outputs: [y],
    backward: ([ct]) => {
      if (!ct) return [undefined]
      const dy = cotangentIn(ct, y)
      const dx = newArray(xs, xs.shape, xs.spec)
      apply(dy, pos, invFreq, dx, -1, scaling)
      if (dy !== ct) dy.dispose()
      return [dx]
    },
  })
  return y
}
