/**
 * Token embedding lookup. Table [V, D]: axes that split the batch are gathered (FSDP); a vocabulary
 * split over other axes is vocabulary-parallel (each device looks up the ids it holds, zeros
 * elsewhere, so the output is partial over those axes); a D split carries to the output.
 */
import { record } from "../autodiff.ts"
import { dtypeCode } from "../dtype.ts"
import { numel } from "../shape.ts"
import type { ShardedArray } from "../shardedArray.ts"
import { cotangentIn, entriesOf, specOf, toLayout } from "./layout.ts"
import { newArray, statsDtype } from "./local.ts"

/** ids [...] int32 → [..., D]. */
export const embedding = (ids: ShardedArray, table: ShardedArray): ShardedArray => {
  if (ids.dtype !== "int32") throw new Error("embedding: ids must be int32")
  const idsE = entriesOf(ids)
  const batchAxes = idsE.flat()
  const [v0, d0] = entriesOf(table) as [string[], string[]]
  const vAxes = v0.filter((a) => !batchAxes.includes(a))
  const dAxes = d0.filter((a) => !batchAxes.includes(a))
  const t = toLayout(table, specOf([vAxes, dAxes]))
  const out = newArray(t, [...ids.shape, table.shape[1]!], specOf([...idsE, dAxes]), vAxes)
  const N = numel(ids.localShape)
  const [Vl, Dl] = t.localShape as [number, number]
  const code = dtypeCode(t.dtype)
  const start = (p: number) => (vAxes.length ? t.mesh.indexAlong(p, vAxes) * Vl : 0)
  for (let p = 0; p < t.mesh.size; p++)
    t.engine.backend.exec(
      "embedding_fwd",
      [t.buffer(p), ids.buffer(p), out.buffer(p)],
      [code, N, Vl, Dl, start(p)],
    )
  record(t.engine, {
    name: "embedding",
    inputs: [t],
    outputs: [out],
    backward: ([ct]) => {
      if (!ct) return [undefined]
      const dy = cotangentIn(ct, out)
      const dt = newArray(t, t.shape, t.spec, batchAxes, statsDtype(t.dtype))
      for (let p = 0; p < t.mesh.size; p++)
        t.engine.backend.exec(
          "embedding_bwd",
          [ids.buffer(p), dy.buffer(p), dt.buffer(p)],
          [code, N, Vl, Dl, start(p), 0],
        )
      if (dy !== ct) dy.dispose()
      return [dt]
    },
  })
  return out
}
