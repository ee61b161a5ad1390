/**
 * Helpers for ops that run the same native op on every mesh position over that position's
 * buffers: the single controller drives all devices, one op call each.
 */
import { type DType, dtypeCode } from "../dtype.ts"
import type { Engine } from "../engine.ts"
import type { Shape } from "../shape.ts"
import { allocateArray, type ShardedArray } from "../shardedArray.ts"
import { NamedSharding, type PartitionSpec } from "../sharding.ts"

/** Calls f for every mesh position. */
export const forEachPosition = (x: ShardedArray, f: (position: number) => void): void => {
  for (let p = 0; p < x.mesh.size; p++) f(p)
}

/** A new array on x's mesh: same dtype unless given, spec and partial axes as given. */
export const newArray = (
  x: ShardedArray,
  shape: Shape,
  spec: PartitionSpec,
  partial: ReadonlyArray<string> = [],
  dtype = x.dtype,
): ShardedArray => allocateArray(x.engine, shape, dtype, new NamedSharding(x.mesh, spec), partial)

/** An array with x's shape, dtype and layout. */
export const like = (x: ShardedArray): ShardedArray =>
  allocateArray(x.engine, x.shape, x.dtype, x.sharding, x.partial)

/**
 * The dtype of statistics (rstd, lse, loss terms) and weight-gradient accumulators for compute in
 * `dtype`: float32 under bfloat16 compute, else the same (OPS.md, Mixed precision).
 */
export const statsDtype = (dtype: DType): DType => (dtype === "bfloat16" ? "float32" : dtype)

/** The native dtype code for compute ops, which take float32 or float64 on the CPU. */
export const computeCode = (x: ShardedArray): number => dtypeCode(x.dtype)

/** Runs `op` on every position with buffers picked per position. */
export const execEach = (
  engine: Engine,
  x: ShardedArray,
  op: string,
  buffers: (position: number) => ReadonlyArray<number>,
  args: ReadonlyArray<number> | ((position: number) => ReadonlyArray<number>),
): void => {
  for (let p = 0; p < x.mesh.size; p++)
    engine.backend.exec(op, buffers(p), typeof args === "function" ? args(p) : args)
}
