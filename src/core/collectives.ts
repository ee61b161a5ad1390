/**
 * Collectives over mesh axes, on sharded arrays. A group is the set of mesh positions that differ
 * only along the axes (mesh.groups); its members' buffers are passed in rank order to the
 * backend's all_reduce / all_gather / reduce_scatter / broadcast ops, which run in process on the
 * CPU and through NCCL on GPUs (the communicator key says which group).
 *
 * `relayout` converts an array between any two layouts (spec + partial axes) with the fewest of
 * these: reduce partial sums (reduce-scatter where the target splits a dimension over the same
 * axes, else all-reduce), all-gather dimensions split over axes the target does not use, and
 * slice locally where the target splits further.
 */
import { boxArgs } from "./backend.ts"
import { dtypeCode, itemSize } from "./dtype.ts"
import type { Mesh } from "./mesh.ts"
import { numel } from "./shape.ts"
import { allocateArray, type ShardedArray } from "./shardedArray.ts"
import { NamedSharding, PartitionSpec, sameSplit } from "./sharding.ts"

/** Which communicator a collective runs on: a group of a mesh over some axes. */
export interface CommKey {
  readonly mesh: Mesh
  readonly axes: ReadonlyArray<string>
  /** Index of the group in mesh.groups(axes). */
  readonly group: number
}

/**
 * How collectives reach the devices. The in-process CPU backend ignores the communicator; the
 * NCCL layer maps each key to a communicator it created.
 */
export interface CollectiveBackend {
  communicator(key: CommKey): number
}

export const inProcessCollectives: CollectiveBackend = { communicator: () => 0 }

const opCode = { sum: 0, max: 1 } as const
export type ReduceOp = keyof typeof opCode

const sameAxes = (a: ReadonlyArray<string>, b: ReadonlyArray<string>) =>
  a.length === b.length && a.every((x, i) => x === b[i])

const withEntry = (spec: PartitionSpec, rank: number, dim: number, axes: ReadonlyArray<string>) => {
  const entries = spec.padTo(rank).entries.map((e) => [...e])
  entries[dim] = [...axes]
  return new PartitionSpec(entries)
}

/** Collective operations of one engine (the backend runs them; `comms` picks communicators). */
export class Collectives {
  constructor(private readonly comms: CollectiveBackend = inProcessCollectives) {}

  private groups(mesh: Mesh, axes: ReadonlyArray<string>) {
    return mesh
      .groups(axes)
      .map((positions, group) => ({ positions, comm: this.comms.communicator({ mesh, axes, group }) }))
  }

  /** A copy of x with its partial sums over `axes` reduced (sum) or the max taken over `axes`. */
  allReduce(x: ShardedArray, axes: ReadonlyArray<string>, op: ReduceOp = "sum"): ShardedArray {
    const partial = op === "sum" ? x.partial.filter((a) => !axes.includes(a)) : x.partial
    const out = allocateArray(x.engine, x.shape, x.dtype, x.sharding, partial)
    const backend = x.engine.backend
    const bytes = x.bytesPerDevice
    for (let p = 0; p < x.mesh.size; p++) backend.copy(out.buffer(p), 0, x.buffer(p), 0, bytes)
    if (axes.length === 0) return out
    const n = numel(x.localShape)
    for (const { positions, comm } of this.groups(x.mesh, axes)) {
      if (positions.length === 1) continue
      backend.exec(
        "all_reduce",
        positions.map((p) => out.buffer(p)),
        [dtypeCode(x.dtype), n, opCode[op], comm],
      )
    }
    return out
  }

  /**
   * Gathers dimension `dim` over `axes`, which must be the trailing (minor) axes of that
   * dimension's spec entry: the result is split over the remaining (major) axes only.
   */
  allGather(x: ShardedArray, dim: number, axes: ReadonlyArray<string>): ShardedArray {
    const entry = x.spec.padTo(x.rank).entries[dim]!
    const keep = entry.slice(0, entry.length - axes.length)
    if (!sameAxes(entry.slice(keep.length), axes))
      throw new Error(
        `allGather: (${axes.join(", ")}) are not the minor axes of dimension ${dim} in ${x.spec}`,
      )
    const target = new NamedSharding(x.mesh, withEntry(x.spec, x.rank, dim, keep))
    const out = allocateArray(x.engine, x.shape, x.dtype, target, x.partial)
    const k = x.mesh.axesSize(axes)
    const local = x.localShape
    const outer = numel(local.slice(0, dim))
    const backend = x.engine.backend
    const esize = itemSize(x.dtype)
    const n = numel(local)
    for (const { positions, comm } of this.groups(x.mesh, axes)) {
      const inputs = positions.map((p) => x.buffer(p))
      if (outer === 1) {
        // Blocks along the outermost non-trivial dimension are contiguous: gather in place.
        backend.exec("all_gather", [...inputs, ...positions.map((p) => out.buffer(p))], [esize, k, n, comm])
        continue
      }
      const temps = positions.map((p) => x.engine.allocate(x.mesh.devices[p]!, n * k * esize))
      try {
        backend.exec("all_gather", [...inputs, ...temps], [esize, k, n, comm])
        const outLocal = [...local]
        outLocal[dim] = local[dim]! * k
        positions.forEach((p, i) => {
          for (let j = 0; j < k; j++) {
            const dstStart = local.map((_, d) => (d === dim ? j * local[dim]! : 0))
            backend.exec(
              "copy_box",
              [temps[i]!, out.buffer(p)],
              [
                esize,
                ...boxArgs(
                  [k, ...local],
                  [j, ...local.map(() => 0)],
                  [1, ...outLocal],
                  [0, ...dstStart],
                  [1, ...local],
                ),
              ],
            )
          }
        })
      } finally {
        for (const t of temps) backend.free(t)
      }
    }
    return out
  }

  /**
   * Sums x's partial values over `axes` and leaves each rank its block of dimension `dim`, which
   * becomes split over `axes` (appended as minor axes of that dimension).
   */
  reduceScatter(x: ShardedArray, dim: number, axes: ReadonlyArray<string>): ShardedArray {
    if (!axes.every((a) => x.partial.includes(a)))
      throw new Error("reduceScatter: x is not partial over those axes")
    const entry = x.spec.padTo(x.rank).entries[dim]!
    const target = new NamedSharding(x.mesh, withEntry(x.spec, x.rank, dim, [...entry, ...axes]))
    const out = allocateArray(
      x.engine,
      x.shape,
      x.dtype,
      target,
      x.partial.filter((a) => !axes.includes(a)),
    )
    const k = x.mesh.axesSize(axes)
    const local = x.localShape
    const outLocal = out.localShape
    const outer = numel(local.slice(0, dim))
    const backend = x.engine.backend
    const esize = itemSize(x.dtype)
    const nOut = numel(outLocal)
    for (const { positions, comm } of this.groups(x.mesh, axes)) {
      const outputs = positions.map((p) => out.buffer(p))
      if (outer === 1) {
        backend.exec(
          "reduce_scatter",
          [...positions.map((p) => x.buffer(p)), ...outputs],
          [dtypeCode(x.dtype), k, nOut, opCode.sum, comm],
        )
        continue
      }
      // Put block j of `dim` at offset j·nOut so rank j's block is contiguous.
      const temps = positions.map((p) => x.engine.allocate(x.mesh.devices[p]!, nOut * k * esize))
      try {
        positions.forEach((p, i) => {
          for (let j = 0; j < k; j++) {
            const srcStart = local.map((_, d) => (d === dim ? j * outLocal[dim]! : 0))
            backend.exec(
              "copy_box",
              [x.buffer(p), temps[i]!],
              [
                esize,
                ...boxArgs(
                  [1, ...local],
                  [0, ...srcStart],
                  [k, ...outLocal],
                  [j, ...outLocal.map(() => 0)],
                  [1, ...outLocal],
                ),
              ],
            )
          }
        })
        backend.exec(
          "reduce_scatter",
          [...temps, ...outputs],
          [dtypeCode(x.dtype), k, nOut, opCode.sum, comm],
        )
      } finally {
        for (const t of temps) backend.free(t)
      }
    }
    return out
  }

  /** Splits dimension `dim` further over `axes` (x must be replicated over them): no communication. */
  slice(x: ShardedArray, dim: number, axes: ReadonlyArray<string>): ShardedArray {
    const entry = x.spec.padTo(x.rank).entries[dim]!
    const target = new NamedSharding(x.mesh, withEntry(x.spec, x.rank, dim, [...entry, ...axes]))
    const out = allocateArray(x.engine, x.shape, x.dtype, target, x.partial)
    const local = x.localShape
    const outLocal = out.localShape
    const esize = itemSize(x.dtype)
    for (let p = 0; p < x.mesh.size; p++) {
      const j = x.mesh.indexAlong(p, axes)
      const srcStart = local.map((_, d) => (d === dim ? j * outLocal[dim]! : 0))
      x.engine.backend.exec(
        "copy_box",
        [x.buffer(p), out.buffer(p)],
        [
          esize,
          ...boxArgs(
            local,
            srcStart,
            outLocal,
            outLocal.map(() => 0),
            outLocal,
          ),
        ],
      )
    }
    return out
  }

  /** Every rank of each group gets the root rank's value. */
  broadcast(x: ShardedArray, axes: ReadonlyArray<string>, root = 0): void {
    const esize = itemSize(x.dtype)
    const n = numel(x.localShape)
    for (const { positions, comm } of this.groups(x.mesh, axes)) {
      if (positions.length === 1) continue
      x.engine.backend.exec(
        "broadcast",
        positions.map((p) => x.buffer(p)),
        [esize, n, root, comm],
      )
    }
  }

  /**
   * The same global value under spec `target` (not partial). Intermediate arrays are freed;
   * the result is a new array even when nothing changes, so callers may dispose either.
   */
  relayout(x: ShardedArray, target: PartitionSpec): ShardedArray {
    const rank = x.rank
    // Only axes of one device differ: the data stays where it is (a copy, under the new spec).
    if (hasLayout(x, target)) {
      const out = allocateArray(x.engine, x.shape, x.dtype, new NamedSharding(x.mesh, target.padTo(rank)))
      for (let p = 0; p < x.mesh.size; p++)
        x.engine.backend.copy(out.buffer(p), 0, x.buffer(p), 0, x.bytesPerDevice)
      return out
    }
    const want = target.padTo(rank).entries
    let cur = x
    const step = (next: ShardedArray) => {
      if (cur !== x) cur.dispose()
      cur = next
    }
    // 1. Partial sums: reduce-scatter onto a dimension the target splits over exactly those
    //    axes after what it is split over now; all-reduce the rest.
    let pending = [...x.partial]
    for (let d = 0; d < rank && pending.length > 0; d++) {
      const have = cur.spec.padTo(rank).entries[d]!
      const w = want[d]!
      if (w.length <= have.length || !sameAxes(w.slice(0, have.length), have)) continue
      const extra = w.slice(have.length)
      if (extra.every((a) => pending.includes(a))) {
        step(this.reduceScatter(cur, d, extra))
        pending = pending.filter((a) => !extra.includes(a))
      }
    }
    if (pending.length > 0) step(this.allReduce(cur, pending))
    // 2. Gather each dimension back to the longest prefix it shares with the target.
    for (let d = 0; d < rank; d++) {
      const have = cur.spec.padTo(rank).entries[d]!
      const w = want[d]!
      let common = 0
      while (common < have.length && common < w.length && have[common] === w[common]) common++
      if (common < have.length) step(this.allGather(cur, d, have.slice(common)))
    }
    // 3. Split further where the target does.
    for (let d = 0; d < rank; d++) {
      const have = cur.spec.padTo(rank).entries[d]!
      const w = want[d]!
      if (w.length > have.length) step(this.slice(cur, d, w.slice(have.length)))
    }
    return cur === x ? this.clone(x) : cur
  }

  /** A copy of x in new buffers. */
  clone(x: ShardedArray): ShardedArray {
    return this.allReduce(x, [])
  }
}

/** True when x already has this layout (spec and no partial sums). */
export const hasLayout = (x: ShardedArray, target: PartitionSpec): boolean =>
  x.partial.length === 0 && sameSplit(x.mesh, x.spec, target, x.rank)

/** True when a and b are split alike (axes of one device aside) with the same partial sums. */
export const sameLayout = (a: ShardedArray, b: ShardedArray): boolean =>
  sameSplit(a.mesh, a.spec, b.spec, Math.max(a.rank, b.rank)) &&
  a.partial.length === b.partial.length &&
  a.partial.every((x) => b.partial.includes(x))
