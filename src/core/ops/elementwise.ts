/**
 * Elementwise ops on arrays of one layout: fill, add (the residual connection), scale.
 */
import { record } from "../autodiff.ts"
import { sameLayout } from "../collectives.ts"
import { type DType, dtypeCode } from "../dtype.ts"
import type { Engine } from "../engine.ts"
import { numel, type Shape } from "../shape.ts"
import { allocateArray, ShardedArray, shardToHost } from "../shardedArray.ts"
import { NamedSharding, PartitionSpec } from "../sharding.ts"
import { execEach, like, statsDtype } from "./local.ts"

/** An array filled with one value. */
export const fillArray = (
  engine: Engine,
  shape: Shape,
  dtype: DType,
  sharding: NamedSharding,
  value: number,
): ShardedArray => {
  const out = allocateArray(engine, shape, dtype, sharding)
  execEach(engine, out, "fill", (p) => [out.buffer(p)], [dtypeCode(dtype), numel(out.localShape), value])
  return out
}

/**
 * a + b. Both must have one shape; b is converted to a's layout when they differ. With `out`
 * (which may be a), writes there and records nothing: an in-place update outside autodiff.
 */
export const add = (a: ShardedArray, b: ShardedArray, out?: ShardedArray): ShardedArray => {
  if (a.shape.length !== b.shape.length || a.shape.some((d, i) => d !== b.shape[i]))
    throw new Error(`add: shapes [${a.shape}] and [${b.shape}] differ`)
  const engine = a.engine
  const bb = sameLayout(a, b) ? b : engine.collectives.relayout(b, a.spec)
  const aa = sameLayout(a, bb) ? a : engine.collectives.relayout(a, a.spec)
  const result = out ?? like(aa)
  const n = numel(aa.localShape)
  execEach(engine, aa, "add", (p) => [aa.buffer(p), bb.buffer(p), result.buffer(p)], [dtypeCode(a.dtype), n])
  if (bb !== b) bb.dispose()
  if (aa !== a) aa.dispose()
  if (!out)
    record(engine, {
      name: "add",
      inputs: [a, b],
      outputs: [result],
      backward: ([ct]) => [ct, ct ? engine.collectives.clone(ct) : undefined],
    })
  return result
}

/** c·x. */
export const scale = (x: ShardedArray, c: number): ShardedArray => {
  const engine = x.engine
  const out = like(x)
  execEach(engine, x, "axpby", (p) => [x.buffer(p), out.buffer(p)], [
    dtypeCode(x.dtype),
    numel(x.localShape),
    c,
    0,
  ])
  record(engine, {
    name: "scale",
    inputs: [x],
    outputs: [out],
    backward: ([ct]) => [ct ? scale(ct, c) : undefined],
  })
  return out
}

/**
 * x converted to another dtype (bfloat16 copies of float32 master weights); the gradient converts
 * back. A parameter with a shadow in that dtype (Engine.withCastShadows: the train step keeps them,
 * written by the optimizer with each update) is not cast: the result is a view of its shadow,
 * recorded on the tape the same way.
 */
export const castTo = (x: ShardedArray, dtype: DType): ShardedArray => {
  if (x.dtype === dtype) return x
  const engine = x.engine
  const shadow = x.partial.length === 0 ? engine.castShadow(x, dtype) : undefined
  let out: ShardedArray
  if (
    shadow &&
    shadow.sharding === x.sharding &&
    shadow.rank === x.rank &&
    shadow.shape.every((d, i) => d === x.shape[i])
  ) {
    // A view: each use is its own array on the tape, and freeing it leaves the shadow alone.
    out = new ShardedArray(engine, x.shape, dtype, x.sharding, shadow.buffers, [], shadow)
  } else {
    out = allocateArray(engine, x.shape, dtype, x.sharding, x.partial)
    const n = numel(x.localShape)
    execEach(engine, x, "cast", (p) => [x.buffer(p), out.buffer(p)], [
      dtypeCode(x.dtype),
      dtypeCode(dtype),
      n,
    ])
  }
  record(engine, {
    name: "cast",
    inputs: [x],
    outputs: [out],
    backward: ([ct]) => [ct ? (ct.dtype === x.dtype ? ct : castTo(ct, x.dtype)) : undefined],
  })
  return out
}

/** Σ x·w over every element: a scalar (replicated). Turns any array into a loss for gradient checks. */
export const weightedSum = (x: ShardedArray, w: ShardedArray): ShardedArray => {
  const engine = x.engine
  const xs = x.partial.length ? engine.collectives.relayout(x, x.spec) : x
  const ws = sameLayout(xs, w) ? w : engine.collectives.relayout(w, xs.spec)
  const prod = like(xs)
  const n = numel(xs.localShape)
  execEach(engine, xs, "mul", (p) => [xs.buffer(p), ws.buffer(p), prod.buffer(p)], [dtypeCode(x.dtype), n])
  // Each device sums its block; blocks replicated r times are counted once.
  const axes = [...xs.mesh.axisNames]
  const partial = allocateArray(
    engine,
    [],
    statsDtype(x.dtype),
    new NamedSharding(xs.mesh, new PartitionSpec([])),
    axes,
  )
  execEach(engine, xs, "sum", (p) => [prod.buffer(p), partial.buffer(p)], [
    dtypeCode(x.dtype),
    n,
    1 / xs.sharding.replication,
    0,
  ])
  const out = engine.collectives.allReduce(partial, axes)
  prod.dispose()
  partial.dispose()
  if (xs !== x) xs.dispose()
  record(engine, {
    name: "weighted_sum",
    inputs: [x],
    outputs: [out],
    backward: ([ct]) => {
      if (!ct) return [undefined]
      const c = ct.constant ?? Number(shardToHost(ct, 0)[0])
      const g = allocateArray(engine, ws.shape, ws.dtype, ws.sharding)
      execEach(engine, ws, "axpby", (p) => [ws.buffer(p), g.buffer(p)], [dtypeCode(ws.dtype), n, c, 0])
      return [g]
    },
  })
  return out
}
