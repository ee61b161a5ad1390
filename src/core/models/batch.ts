/**
 * Host batches onto the mesh: rows split over the batch axes, everything else replicated.
 */
import { Effect, Schema } from "effect"
import type { DType } from "../dtype.ts"
import type { Engine } from "../engine.ts"
import type { Mesh } from "../mesh.ts"
import { fromHost, type ShardedArray } from "../shardedArray.ts"
import { NamedSharding, PartitionSpec } from "../sharding.ts"
import { batchAxes, type TokenBatch } from "./decoder.ts"

/** A batch as host arrays, row-major [B, T]. */
export interface HostTokenBatch {
  readonly batchSize: number
  readonly length: number
  readonly inputIds: Int32Array
  readonly positions: Int32Array
  /** Next-token targets, < 0 where ignored. */
  readonly targets: Int32Array
  /** 1 where a token is real; absent when every token is. */
  readonly attentionMask?: Uint8Array
}

export class BatchNotDivisible extends Schema.TaggedError<BatchNotDivisible>()("BatchNotDivisible", {
  batchSize: Schema.Number,
  axes: Schema.Array(Schema.String),
  parts: Schema.Number,
}) {
  override get message() {
    return `batch size ${this.batchSize} cannot be split evenly over mesh axes (${this.axes.join(", ")}) of size ${this.parts}: use a multiple of ${this.parts}`
  }
}

/** Places a host batch: rowScale is 1/(targets counted in the whole batch), for a mean loss. */
export const placeBatch = (engine: Engine, mesh: Mesh, batch: HostTokenBatch, dtype: DType = "float32") =>
  Effect.gen(function* () {
    const axes = batchAxes(mesh)
    const parts = mesh.axesSize(axes)
    if (batch.batchSize % parts !== 0)
      return yield* new BatchNotDivisible({ batchSize: batch.batchSize, axes, parts })
    const shape = [batch.batchSize, batch.length]
    const sharding = new NamedSharding(mesh, new PartitionSpec([axes, []]))
    let counted = 0
    for (const t of batch.targets) if (t >= 0) counted++
    const scaleHost =
      dtype === "float64" ? new Float64Array(batch.targets.length) : new Float32Array(batch.targets.length)
    scaleHost.fill(counted > 0 ? 1 / counted : 0)
    const place = (data: ArrayBufferView, t: DType, name: string) =>
      fromHost(engine, data, shape, t, sharding, name)
    const out: { -readonly [K in keyof TokenBatch]: TokenBatch[K] } = {
      inputIds: yield* place(batch.inputIds, "int32", "input_ids"),
      positions: yield* place(batch.positions, "int32", "positions"),
      targets: yield* place(batch.targets, "int32", "targets"),
      rowScale: yield* place(scaleHost, dtype, "row scale"),
    }
    if (batch.attentionMask) out.keyMask = yield* place(batch.attentionMask, "uint8", "attention_mask")
    return { batch: out as TokenBatch, counted }
  })

/** Frees a placed batch. */
export const disposeBatch = (b: TokenBatch): void => {
  for (const a of [b.inputIds, b.positions, b.targets, b.rowScale, b.keyMask] as Array<
    ShardedArray | undefined
  >)
    a?.dispose()
}
