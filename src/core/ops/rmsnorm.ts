/**
 * RMSNorm over the last dimension: y = x·rstd·(w + offset), rstd = 1/√(mean(x²) + eps); offset 1
 * is Gemma's (1 + w). The normalised dimension is gathered where split; the weight is replicated.
 */
import { record } from "../autodiff.ts"
import { dtypeCode } from "../dtype.ts"
import { numel } from "../shape.ts"
import type { ShardedArray } from "../shardedArray.ts"
import { P } from "../sharding.ts"
import { cotangentIn, entriesOf, specOf, toLayout } from "./layout.ts"
import { newArray, statsDtype } from "./local.ts"

export const rmsnorm = (x: ShardedArray, w: ShardedArray, eps: number, offset: 0 | 1 = 0): ShardedArray => {
  const rank = x.rank
  const lead = entriesOf(x).slice(0, rank - 1)
  const xs = toLayout(x, specOf([...lead, []]))
  const ws = toLayout(w, P())
  const y = newArray(xs, xs.shape, xs.spec)
  const rstd = newArray(xs, xs.shape.slice(0, rank - 1), specOf(lead), [], statsDtype(xs.dtype))
  const D = x.shape[rank - 1]!
  const N = numel(xs.localShape.slice(0, rank - 1))
  const code = dtypeCode(x.dtype)
  for (let p = 0; p < xs.mesh.size; p++)
    xs.engine.backend.exec(
      "rmsnorm_fwd",
      [xs.buffer(p), ws.buffer(p), y.buffer(p), rstd.buffer(p)],
      [code, N, D, eps, offset],
    )
  record(x.engine, {
    name: "rmsnorm",
    inputs: [xs, ws, rstd],
    outputs: [y],
    backward: ([ct], into) => {
      if (!ct) return [undefined, undefined, undefined]
      const dy = cotangentIn(ct, y)
      // x usually also feeds a residual add: dx adds into the cotangent that left.
      const prev = into(0, { shape: xs.shape, dtype: xs.dtype, mesh: xs.mesh, spec: xs.spec, partial: [] }, [
        dy,
        xs,
        ws,
        rstd,
      ])
      const dx = prev ?? newArray(xs, xs.shape, xs.spec)
      // dw sums over rows: partial over the axes that split them.
      const dw = newArray(ws, ws.shape, ws.spec, lead.flat(), statsDtype(ws.dtype))
      for (let p = 0; p < xs.mesh.size; p++)
        xs.engine.backend.exec(
          "rmsnorm_bwd",
          [dy.buffer(p), xs.buffer(p), ws.buffer(p), rstd.buffer(p), dx.buffer(p), dw.buffer(p)],
          [code, N, D, offset, 0, prev ? 1 : 0],
        )
      if (dy !== ct) dy.dispose()
      return [dx, dw, undefined]
    },
  })
  return y
}
