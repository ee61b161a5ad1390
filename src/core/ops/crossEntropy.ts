/**
 * The loss head: mean cross-entropy of the next-token targets, fused with the output projection
 * (logits a chunk of the vocabulary at a time; they never exist whole). h [B, T, D], W [V, D],
 * targets [B, T] int32 (< 0 ignored), rowScale [B, T] (1/number of counted targets in the global
 * batch, or any per-token weight). The loss is Σ rowScale·(lse − logit[target]).
 *
 * A vocabulary split over mesh axes is vocabulary-parallel: each device takes the max, the sum of
 * exponentials and the target logit over its rows, and these are combined over those axes, so no
 * device ever holds every logit of a token.
 *
 * With the vocabulary whole on each device and a gradient wanted, one op (ce_fused) does the
 * forward and the backward at once, a chunk of rows at a time with each row's logits whole: the
 * gradients are made in the forward pass (for a unit cotangent) and kept for the backward rule,
 * which saves making the logits a second time.
 */
import { record, wantsGrad } from "../autodiff.ts"
import { dtypeCode } from "../dtype.ts"
import { numel } from "../shape.ts"
import type { ShardedArray } from "../shardedArray.ts"
import { shardToHost } from "../shardedArray.ts"
import { P } from "../sharding.ts"
import { entriesOf, specOf, toLayout } from "./layout.ts"
import { newArray, statsDtype } from "./local.ts"

/** Rows of the vocabulary processed at once; small enough to stay in cache on the CPU. */
const CHUNK = 512
/** Rows per chunk of ce_fused: 0 lets the backend pick (CUDA: about 1 GiB of float32 logits). */
const FUSED_ROWS = 0

export const crossEntropyLoss = (
  h: ShardedArray,
  w: ShardedArray,
  targets: ShardedArray,
  rowScale: ShardedArray,
): ShardedArray => {
  const engine = h.engine
  const coll = engine.collectives
  const [b, t] = entriesOf(h) as [string[], string[]]
  const rowAxes = [...b, ...t]
  const hs = toLayout(h, specOf([b, t, []]))
  const vAxes = entriesOf(w)[0]!.filter((a) => !rowAxes.includes(a))
  const ws = toLayout(w, specOf([vAxes, []]))
  const rowSpec = specOf([b, t])
  const tg = targets.spec.padTo(2).equals(rowSpec) ? targets : coll.relayout(targets, rowSpec)
  const rs = rowScale.spec.padTo(2).equals(rowSpec) ? rowScale : coll.relayout(rowScale, rowSpec)
  const mesh = h.mesh
  const code = dtypeCode(h.dtype)
  const N = numel(hs.localShape.slice(0, 2))
  const D = hs.shape[2]!
  const Vl = ws.localShape[0]!
  const start = (p: number) => (vAxes.length ? mesh.indexAlong(p, vAxes) * Vl : 0)
  const rows = [h.shape[0]!, h.shape[1]!]
  const stats = statsDtype(h.dtype)
  const backend = engine.backend
  /** Σ of the per-row losses over every row: a replicated scalar. */
  const total = (rowLoss: ShardedArray): ShardedArray => {
    // Σ over this device's rows: partial over the axes that split the rows.
    const partialLoss = newArray(hs, [], P(), rowAxes, stats)
    for (let p = 0; p < mesh.size; p++)
      backend.exec("sum", [rowLoss.buffer(p), partialLoss.buffer(p)], [dtypeCode(stats), N, 1, 0])
    const loss = coll.allReduce(partialLoss, rowAxes)
    partialLoss.dispose()
    return loss
  }
  if (vAxes.length === 0 && (wantsGrad(engine, hs) || wantsGrad(engine, ws))) {
    const lse = newArray(hs, rows, rowSpec, [], stats)
    const rowLoss = newArray(hs, rows, rowSpec, [], stats)
    const dh = newArray(hs, hs.shape, hs.spec, vAxes)
    const dw = newArray(ws, ws.shape, ws.spec, rowAxes, stats)
    for (let p = 0; p < mesh.size; p++)
      backend.exec(
        "ce_fused",
        [
          hs.buffer(p),
          ws.buffer(p),
          tg.buffer(p),
          rs.buffer(p),
          lse.buffer(p),
          rowLoss.buffer(p),
          dh.buffer(p),
          dw.buffer(p),
        ],
        [code, N, D, Vl, FUSED_ROWS, 1, 0],
      )
    const loss = total(rowLoss)
    lse.dispose()
    rowLoss.dispose()
    // dh and dw wait for the backward pass (the step's tidy block frees them if it never runs).
    record(engine, {
      name: "cross_entropy_fused",
      inputs: [hs, ws],
      outputs: [loss],
      backward: ([ct]) => {
        if (!ct) {
          dh.dispose()
          dw.dispose()
          return [undefined, undefined]
        }
        // The gradients were made for a unit cotangent (a replicated scalar, 1 when the loss is
        // what is differentiated); any other scales them in place.
        const c = ct.constant ?? Number(shardToHost(ct, 0)[0])
        if (c !== 1)
          for (const g of [dh, dw])
            for (let p = 0; p < mesh.size; p++)
              backend.exec(
                "axpby",
                [g.buffer(p), g.buffer(p)],
                [dtypeCode(g.dtype), numel(g.localShape), c, 0],
              )
        return [dh, dw]
      },
    })
    return loss
  }
  const m = newArray(hs, rows, rowSpec, [], stats)
  const s = newArray(hs, rows, rowSpec, vAxes, stats)
  const z = newArray(hs, rows, rowSpec, vAxes, stats)
  for (let p = 0; p < mesh.size; p++)
    backend.exec(
      "ce_fwd",
      [hs.buffer(p), ws.buffer(p), tg.buffer(p), m.buffer(p), s.buffer(p), z.buffer(p)],
      [code, N, D, Vl, start(p), CHUNK],
    )
  let mG = m
  let sG = s
  let zG = z
  if (vAxes.length > 0) {
    mG = coll.allReduce(m, vAxes, "max")
    for (let p = 0; p < mesh.size; p++)
      backend.exec("ce_rescale", [m.buffer(p), mG.buffer(p), s.buffer(p)], [code, N])
    sG = coll.allReduce(s, vAxes)
    zG = coll.allReduce(z, vAxes)
  }
  const lse = newArray(hs, rows, rowSpec, [], stats)
  const rowLoss = newArray(hs, rows, rowSpec, [], stats)
  for (let p = 0; p < mesh.size; p++) {
    backend.exec("ce_lse", [mG.buffer(p), sG.buffer(p), lse.buffer(p)], [code, N])
    backend.exec(
      "ce_rowloss",
      [lse.buffer(p), zG.buffer(p), tg.buffer(p), rs.buffer(p), rowLoss.buffer(p)],
      [code, N],
    )
  }
  const loss = total(rowLoss)
  for (const a of [m, s, z, rowLoss]) a.dispose()
  if (mG !== m) mG.dispose()
  if (sG !== s) sG.dispose()
  if (zG !== z) zG.dispose()
  record(engine, {
    name: "cross_entropy",
    inputs: [hs, ws, lse],
    outputs: [loss],
    backward: ([ct]) => {
      if (!ct) return [undefined, undefined, undefined]
      // The upstream cotangent is a replicated scalar: 1 when the loss is what is differentiated.
      const gradScale = ct.constant ?? Number(shardToHost(ct, 0)[0])
      const dh = newArray(hs, hs.shape, hs.spec, vAxes)
      const dw = newArray(ws, ws.shape, ws.spec, rowAxes, stats)
      for (let p = 0; p < mesh.size; p++)
        backend.exec(
          "ce_bwd",
          [hs.buffer(p), ws.buffer(p), tg.buffer(p), lse.buffer(p), rs.buffer(p), dh.buffer(p), dw.buffer(p)],
          [code, N, D, Vl, start(p), CHUNK, gradScale, 0],
        )
      return [dh, dw, undefined]
    },
  })
  return loss
}
