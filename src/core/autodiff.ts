/**
 * Reverse-mode autodiff over a tape of coarse ops. While `valueAndGrad` runs a function, every op
 * whose inputs depend on the parameters records a node: its inputs, outputs, and a backward rule
 * from output cotangents to input cotangents. The backward pass walks the tape in reverse.
 *
 * Cotangents are sharded arrays too, in whatever layout an op's backward rule produces: a matmul
 * contracting a dimension split over an axis yields a cotangent partial over that axis. Layouts
 * are reconciled only where needed (compute ops normalise the cotangent they receive; parameter
 * gradients are converted to the parameter's sharding), which is exactly where data parallelism
 * needs its all-reduce and FSDP its reduce-scatter. The cotangent of an array that is partial
 * over some axes is replicated over them: every rank's partial value has the same derivative.
 *
 * An array read by several ops collects several contributions. Rules whose kernels can add into
 * their output (matmul's beta, rmsnorm_bwd's accumulateDx) are offered the cotangent collected so
 * far (AccumulationTarget), so the common cases (q/k/v sharing an input, the residual stream) cost
 * no separate add pass; every other contribution is added by `accumulate`.
 */
import { hasLayout, sameLayout } from "./collectives.ts"
import type { DType } from "./dtype.ts"
import type { Engine } from "./engine.ts"
import type { Mesh } from "./mesh.ts"
import { add, fillArray } from "./ops/elementwise.ts"
import type { ShardedArray } from "./shardedArray.ts"
import { isShardedArray } from "./shardedArray.ts"
import { type PartitionSpec, sameSplit } from "./sharding.ts"
import { flattenWithPath, mapWithPath, type Tree } from "./tree.ts"

/** The layout a backward rule would give an input's cotangent. */
export interface CotangentLayout {
  readonly shape: ReadonlyArray<number>
  readonly dtype: DType
  readonly mesh: Mesh
  readonly spec: PartitionSpec
  readonly partial: ReadonlyArray<string>
}

/**
 * The cotangent already accumulated for input i, offered to a rule whose kernel can add its
 * contribution into it (a matmul with beta = 1, rmsnorm_bwd's accumulateDx): an array used from
 * several places (q/k/v reading one normed input, a residual stream) then gets no separate add.
 * Undefined unless that cotangent has exactly the layout `like` and shares no buffer with `reads`
 * (everything the rule's kernels read, which must not alias what they write). A rule that takes
 * the offer returns the same array as that input's cotangent.
 */
export type AccumulationTarget = (
  i: number,
  like: CotangentLayout,
  reads: ReadonlyArray<ShardedArray>,
) => ShardedArray | undefined

export interface TapeNode {
  readonly name: string
  /** Inputs the backward rule produces cotangents for, in order (undefined entries are constants). */
  readonly inputs: ReadonlyArray<ShardedArray | undefined>
  readonly outputs: ReadonlyArray<ShardedArray>
  /** Cotangents of the inputs (undefined where zero or not needed), given those of the outputs. */
  backward(
    cotangents: ReadonlyArray<ShardedArray | undefined>,
    into: AccumulationTarget,
  ): ReadonlyArray<ShardedArray | undefined>
}

export class Tape {
  readonly nodes: TapeNode[] = []
  /** Arrays that depend on a differentiated input. */
  readonly tracked = new Set<ShardedArray>()

  needsGrad(xs: ReadonlyArray<ShardedArray | undefined>): boolean {
    return xs.some((x) => x !== undefined && this.tracked.has(x))
  }
}

/**
 * Records a node if a gradient is being taken and one of its inputs depends on a differentiated
 * input. Ops call this after computing their outputs.
 */
export const record = (engine: Engine, node: TapeNode): void => {
  const tape = engine.tape
  if (!tape?.needsGrad(node.inputs)) return
  tape.nodes.push(node)
  for (const o of node.outputs) tape.tracked.add(o)
}

/** Whether x's gradient is wanted (asked while recording: frozen weights are skipped in backward). */
export const wantsGrad = (engine: Engine, x: ShardedArray): boolean => engine.tape?.tracked.has(x) ?? false

let accumulateInPlace = true

/**
 * Turns the offers of AccumulationTarget off (every contribution then gets its own add): for
 * tests comparing the two. Returns the previous setting.
 */
export const setAccumulateInPlace = (on: boolean): boolean => {
  const was = accumulateInPlace
  accumulateInPlace = on
  return was
}

const sharesBuffer = (a: ShardedArray, others: ReadonlyArray<ShardedArray | undefined>): boolean => {
  const mine = new Set(a.buffers)
  return others.some((o) => o?.buffers.some((b) => mine.has(b)) ?? false)
}

const samePartial = (a: ReadonlyArray<string>, b: ReadonlyArray<string>) =>
  a.length === b.length && a.every((x) => b.includes(x))

/** Whether an accumulated cotangent may take a rule's contribution in place. */
const canTake = (
  prev: ShardedArray,
  like: CotangentLayout,
  reads: ReadonlyArray<ShardedArray | undefined>,
): boolean =>
  // A view writes into another array's buffers, a constant's value is assumed by readers: a
  // separate add leaves both alone.
  prev.base === undefined &&
  prev.constant === undefined &&
  !prev.isDisposed &&
  prev.mesh === like.mesh &&
  prev.dtype === like.dtype &&
  prev.rank === like.shape.length &&
  prev.shape.every((d, k) => d === like.shape[k]) &&
  sameSplit(prev.mesh, prev.spec, like.spec, prev.rank) &&
  // Partial sums add per device only over the same axes (one-device axes never count).
  samePartial(
    prev.partial,
    like.partial.filter((a) => like.mesh.axisSize(a) > 1),
  ) &&
  !sharesBuffer(prev, reads)

/** Adds a cotangent contribution for x into the map, reconciling layouts when they differ. */
const accumulate = (
  engine: Engine,
  cts: Map<ShardedArray, ShardedArray>,
  x: ShardedArray,
  ct: ShardedArray,
) => {
  const prev = cts.get(x)
  if (!prev) {
    cts.set(x, ct)
    return
  }
  // The rule took the AccumulationTarget offer: the contribution is already in.
  if (ct === prev) return
  if (sameLayout(prev, ct)) {
    add(prev, ct, prev)
    ct.dispose()
    return
  }
  const a = engine.collectives.relayout(prev, x.spec)
  const b = engine.collectives.relayout(ct, x.spec)
  prev.dispose()
  ct.dispose()
  add(a, b, a)
  b.dispose()
  cts.set(x, a)
}

/**
 * Walks `tape` backwards from the cotangents in `cts` (keyed by array), accumulating the
 * cotangents of every tracked array into `cts`. Intermediates made on the tape are freed as soon
 * as no remaining node needs them; arrays in `keep` (the differentiated inputs, the value) are not.
 */
export const backprop = (
  engine: Engine,
  tape: Tape,
  cts: Map<ShardedArray, ShardedArray>,
  keep: ReadonlySet<ShardedArray>,
): void => {
  // How many unprocessed nodes still use each array (as input, or as an output their
  // backward rule may read): at zero an intermediate can be freed before the pass ends.
  const users = new Map<ShardedArray, number>()
  for (const n of tape.nodes)
    for (const x of [...n.inputs, ...n.outputs]) if (x) users.set(x, (users.get(x) ?? 0) + 1)
  for (let k = tape.nodes.length - 1; k >= 0; k--) {
    const node = tape.nodes[k]!
    const outCts = node.outputs.map((o) => cts.get(o))
    // A rule may hand an output's cotangent on unchanged (a cast to the same dtype).
    const passed = new Set<ShardedArray>()
    if (outCts.some((c) => c !== undefined)) {
      // The node's output cotangents are read by its rule and freed after it, and its own
      // arrays may be read too: a target aliasing any of them is refused.
      const into: AccumulationTarget = (i, like, reads) => {
        const x = node.inputs[i]
        if (!accumulateInPlace || !x || !tape.tracked.has(x)) return undefined
        const prev = cts.get(x)
        const avoid = [...reads, ...outCts, ...node.inputs, ...node.outputs]
        return prev && canTake(prev, like, avoid) ? prev : undefined
      }
      const inCts = node.backward(outCts, into)
      node.inputs.forEach((x, i) => {
        const ct = inCts[i]
        if (!ct) return
        if (x && tape.tracked.has(x)) {
          passed.add(ct)
          accumulate(engine, cts, x, ct)
        } else if (!outCts.includes(ct)) ct.dispose()
      })
    }
    for (const o of node.outputs) {
      if (keep.has(o)) continue
      const c = cts.get(o)
      if (c && !passed.has(c)) c.dispose()
      cts.delete(o)
    }
    for (const x of [...node.inputs, ...node.outputs]) {
      if (!x) continue
      const left = users.get(x)! - 1
      users.set(x, left)
      // Only arrays made inside f (tracked, not parameters) are ours to free.
      if (left === 0 && tape.tracked.has(x) && !keep.has(x) && !cts.has(x)) x.dispose()
    }
  }
}

export interface ValueAndGrad<P> {
  readonly value: ShardedArray
  /** Gradients with the structure and shardings of the parameters. */
  readonly grads: P
}

/**
 * `valueAndGrad(f)(params, ...args)`: the value of f (a scalar array) and its gradient with
 * respect to every array in `params`, each sharded like its parameter. Temporaries are freed
 * before it returns.
 */
export const valueAndGrad =
  <P extends Tree<ShardedArray>, A extends unknown[]>(f: (params: P, ...args: A) => ShardedArray) =>
  (params: P, ...args: A): ValueAndGrad<P> => {
    const leaves = flattenWithPath(params, isShardedArray).map(([, a]) => a)
    if (leaves.length === 0) throw new Error("valueAndGrad: params holds no arrays")
    const engine = leaves[0]!.engine
    if (engine.tape) throw new Error("valueAndGrad: nested gradients are not supported")
    return engine.tidy(() => {
      const tape = new Tape()
      for (const l of leaves) tape.tracked.add(l)
      engine.tape = tape
      let value: ShardedArray
      try {
        value = f(params, ...args)
      } finally {
        engine.tape = undefined
      }
      if (value.size !== 1)
        throw new Error(`valueAndGrad: f must return a scalar, got shape [${value.shape.join(", ")}]`)
      const cts = new Map<ShardedArray, ShardedArray>()
      if (tape.tracked.has(value)) {
        const seed = fillArray(engine, value.shape, value.dtype, value.sharding, 1)
        seed.constant = 1
        cts.set(value, seed)
      }
      backprop(engine, tape, cts, new Set<ShardedArray>([...leaves, value]))
      const grads = mapWithPath(params, isShardedArray, (_, p) => {
        const ct = cts.get(p)
        if (!ct) return fillArray(engine, p.shape, p.dtype, p.sharding, 0)
        // The accumulated cotangent is the gradient when it is already laid out as p (on one
        // device it always is): handed over, not copied.
        if (hasLayout(ct, p.spec)) return ct
        const g = engine.collectives.relayout(ct, p.spec)
        ct.dispose()
        return g
      }) as P
      return { value: value!, grads }
    })
  }
