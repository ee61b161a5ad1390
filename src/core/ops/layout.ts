/**
 * Layout changes inside a differentiated computation: the forward pass converts an input to the
 * layout an op computes in (an FSDP all-gather of a weight, the all-reduce of a row-parallel
 * output, a free local slice); the backward pass converts the cotangent back, which turns the
 * all-gather into a reduce-scatter and the all-reduce into an identity.
 */
import { record } from "../autodiff.ts"
import { hasLayout } from "../collectives.ts"
import type { Shape } from "../shape.ts"
import { ShardedArray } from "../shardedArray.ts"
import { PartitionSpec } from "../sharding.ts"

/** x under `spec` and without partial sums; x itself when it already is. */
export const toLayout = (x: ShardedArray, spec: PartitionSpec): ShardedArray => {
  if (hasLayout(x, spec)) return x
  const engine = x.engine
  const y = engine.collectives.relayout(x, spec)
  record(engine, {
    name: "relayout",
    inputs: [x],
    outputs: [y],
    backward: ([ct]) => [ct ? engine.collectives.relayout(ct, x.spec) : undefined],
  })
  return y
}

/** A cotangent in the layout a compute op's backward rule reads: the output's spec, summed. */
export const cotangentIn = (ct: ShardedArray, y: ShardedArray): ShardedArray =>
  hasLayout(ct, y.spec) ? ct : ct.engine.collectives.relayout(ct, y.spec)

/** Spec entries padded to the rank, as mutable arrays. */
export const entriesOf = (x: ShardedArray): string[][] => x.spec.padTo(x.rank).entries.map((e) => [...e])

export const specOf = (entries: ReadonlyArray<ReadonlyArray<string>>): PartitionSpec =>
  new PartitionSpec(entries)

/**
 * The same buffers seen with another shape: valid when every position's block keeps its bytes
 * (the caller gives the spec that makes this so). No copy; the view keeps its base alive.
 */
export const view = (x: ShardedArray, shape: Shape, spec: PartitionSpec): ShardedArray => {
  const v = new ShardedArray(
    x.engine,
    [...shape],
    x.dtype,
    x.sharding.mesh === x.mesh ? withSpec(x, spec) : x.sharding,
    x.buffers,
    x.partial,
    x,
  )
  if (v.bytesPerDevice !== x.bytesPerDevice)
    throw new Error(`view: [${shape}] ${spec} does not match [${x.shape}] ${x.spec}`)
  record(x.engine, {
    name: "view",
    inputs: [x],
    outputs: [v],
    backward: ([ct]) => {
      if (!ct) return [undefined]
      const c = cotangentIn(ct, v)
      const back = new ShardedArray(c.engine, [...x.shape], c.dtype, x.sharding, c.buffers, [], c)
      // The view must not outlive c's buffers: hand back a copy that owns its memory.
      const owned = c.engine.collectives.clone(back)
      back.dispose()
      if (c !== ct) c.dispose()
      return [owned]
    },
  })
  return v
}

const withSpec = (x: ShardedArray, spec: PartitionSpec) => {
  const S = x.sharding.constructor as new (mesh: typeof x.mesh, spec: PartitionSpec) => typeof x.sharding
  return new S(x.mesh, spec)
}
