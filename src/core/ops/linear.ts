/**
 * y = x·Wᵀ with x [..., K] and a weight W [N, K] in the Hugging Face [out, in] layout; the
 * computation follows the shardings (DESIGN.md, Sharding):
 *
 * - W's axes that also split x's leading (batch) dimensions are all-gathered first: FSDP. The
 *   backward pass turns that gather into a reduce-scatter of the gradient.
 * - The contraction dimension K must be split the same way on both sides. Where one side is
 *   split and the other replicated, the replicated side is sliced locally (free); otherwise x's
 *   K is re-laid out to W's.
 * - Each device multiplies its blocks. The output keeps x's leading layout and W's remaining
 *   output split (column parallel); it is partial over the axes that split K (row parallel),
 *   and whoever needs it whole all-reduces it.
 */
import { record, wantsGrad } from "../autodiff.ts"
import { dtypeCode } from "../dtype.ts"
import { numel } from "../shape.ts"
import type { ShardedArray } from "../shardedArray.ts"
import { cotangentIn, entriesOf, specOf, toLayout } from "./layout.ts"
import { newArray, statsDtype } from "./local.ts"

const same = (a: ReadonlyArray<string>, b: ReadonlyArray<string>) =>
  a.length === b.length && a.every((x, i) => x === b[i])

/** One matmul per position: C[M, N] = op(A)·op(B), row-major, with the given transposes. */
export const localMatmul = (
  a: ShardedArray,
  b: ShardedArray,
  c: ShardedArray,
  p: number,
  m: number,
  n: number,
  k: number,
  transA: boolean,
  transB: boolean,
  accumulate = false,
): void => {
  const cd = c.dtype === a.dtype ? [] : [dtypeCode(c.dtype)]
  const lda = transA ? m : k
  const ldb = transB ? k : n
  a.engine.backend.exec(
    "matmul",
    [a.buffer(p), b.buffer(p), c.buffer(p)],
    [
      dtypeCode(a.dtype),
      1,
      m,
      n,
      k,
      transA ? 1 : 0,
      transB ? 1 : 0,
      1,
      accumulate ? 1 : 0,
      lda,
      ldb,
      n,
      0,
      0,
      0,
      0,
      0,
      0,
      ...cd,
    ],
  )
}

export const linear = (x: ShardedArray, w: ShardedArray): ShardedArray => {
  const rank = x.rank
  const K = x.shape[rank - 1]!
  if (w.rank !== 2 || w.shape[1] !== K)
    throw new Error(`linear: x [${x.shape}] does not match a weight [${w.shape}] ([out, in] layout)`)
  const xe0 = entriesOf(x)
  const batchAxes = xe0.slice(0, rank - 1).flat()
  const [wo0, wi0] = entriesOf(w) as [string[], string[]]
  const wOut = wo0.filter((a) => !batchAxes.includes(a))
  let wIn = wi0.filter((a) => !batchAxes.includes(a))
  let xs = x.partial.length > 0 ? toLayout(x, x.spec) : x
  const xk = entriesOf(xs)[rank - 1]!
  if (!same(xk, wIn)) {
    if (xk.length > 0 && wIn.length === 0 && !xk.some((a) => wOut.includes(a))) wIn = xk
    else xs = toLayout(xs, specOf([...xe0.slice(0, rank - 1), wIn]))
  }
  const ws = toLayout(w, specOf([wOut, wIn]))
  const contraction = wIn
  const outSpec = specOf([...entriesOf(xs).slice(0, rank - 1), wOut])
  const y = newArray(xs, [...x.shape.slice(0, rank - 1), w.shape[0]!], outSpec, contraction)
  const M = numel(xs.localShape.slice(0, rank - 1))
  const Kl = xs.localShape[rank - 1]!
  const Nl = ws.localShape[0]!
  for (let p = 0; p < xs.mesh.size; p++) localMatmul(xs, ws, y, p, M, Nl, Kl, false, true)
  const needX = wantsGrad(x.engine, xs)
  const needW = wantsGrad(x.engine, ws)
  record(x.engine, {
    name: "linear",
    inputs: [xs, ws],
    outputs: [y],
    backward: ([ct], into) => {
      if (!ct) return [undefined, undefined]
      const dy = cotangentIn(ct, y)
      // dx = dy·W contracts the output dimension: partial over W's output split. Where x feeds
      // other ops too (q, k and v read one normed input), dx adds into the cotangent they left.
      const prev = needX
        ? into(0, { shape: xs.shape, dtype: xs.dtype, mesh: xs.mesh, spec: xs.spec, partial: wOut }, [
            dy,
            ws,
            xs,
          ])
        : undefined
      const dx = needX ? (prev ?? newArray(xs, xs.shape, xs.spec, wOut)) : undefined
      // dW = dyᵀ·x contracts the rows: partial over the axes that split them.
      const dw = needW ? newArray(ws, ws.shape, ws.spec, batchAxes, statsDtype(ws.dtype)) : undefined
      for (let p = 0; p < xs.mesh.size; p++) {
        if (dx) localMatmul(dy, ws, dx, p, M, Kl, Nl, false, false, prev !== undefined)
        if (dw) localMatmul(dy, xs, dw, p, Nl, Kl, M, true, false)
      }
      if (dy !== ct) dy.dispose()
      return [dx, dw]
    },
  })
  return y
}
