/**
 * A sharded array, the counterpart of jax.Array: a global shape and dtype, a NamedSharding, and
 * one buffer per mesh position holding exactly that position's slice. `partial` lists mesh axes
 * over which the true value is the sum of the positions' buffers (an unreduced matmul output);
 * arrays users see are never partial.
 */
import { Effect, Schema } from "effect"
import { type BufferId, boxArgs } from "./backend.ts"
import { type DType, type HostArray, hostArray, itemSize } from "./dtype.ts"
import type { Disposable, Engine } from "./engine.ts"
import { formatShape, numel, type Shape } from "./shape.ts"
import type { NamedSharding, ShardingError, Slice } from "./sharding.ts"
import { type IsLeaf, mapWithPath, type Tree } from "./tree.ts"

export class HostDataMismatch extends Schema.TaggedError<HostDataMismatch>()("HostDataMismatch", {
  what: Schema.String,
  expected: Schema.String,
  got: Schema.String,
}) {
  override get message() {
    return `${this.what}: expected ${this.expected}, got ${this.got}`
  }
}

export class ShardedArray implements Disposable {
  private disposed = false
  /** Set on arrays known to hold one value everywhere (the seed cotangent 1), so ops can skip reading them. */
  constant: number | undefined

  constructor(
    readonly engine: Engine,
    readonly shape: ReadonlyArray<number>,
    readonly dtype: DType,
    readonly sharding: NamedSharding,
    /** One buffer per mesh position, in mesh order. */
    readonly buffers: ReadonlyArray<BufferId>,
    partial: ReadonlyArray<string> = [],
    /** Set on a view: the array whose buffers this one reinterprets (and which must outlive it). */
    readonly base?: ShardedArray,
  ) {
    // A partial sum over an axis of one device is already complete: leaving such axes out keeps
    // later layout changes from copying data that would not move.
    this.partial = partial.filter((a) => sharding.mesh.axisSize(a) > 1)
    engine.track(this)
  }

  /** Mesh axes whose values must still be summed (each of more than one device). */
  readonly partial: ReadonlyArray<string>

  get mesh() {
    return this.sharding.mesh
  }
  get spec() {
    return this.sharding.spec
  }
  get rank(): number {
    return this.shape.length
  }
  get size(): number {
    return numel(this.shape)
  }
  /** The shape of every position's buffer. */
  get localShape(): number[] {
    return this.sharding.shardShape(this.shape)
  }
  /** Bytes each device holds for this array. */
  get bytesPerDevice(): number {
    return numel(this.localShape) * itemSize(this.dtype)
  }
  get isDisposed(): boolean {
    return this.disposed
  }

  /** Frees every buffer now (a view frees nothing); later use of the array is a bug. Idempotent. */
  dispose(): void {
    if (this.disposed) return
    this.disposed = true
    if (!this.base) for (const b of this.buffers) this.engine.backend.free(b)
  }

  /** The buffer at a mesh position, checked alive. */
  buffer(position: number): BufferId {
    if (this.disposed || this.base?.isDisposed)
      throw new Error(`use of a disposed array ${formatShape(this.shape)}`)
    return this.buffers[position]!
  }

  /** What must stay alive for this array to be usable. */
  *dependencies(): Generator<ShardedArray> {
    if (this.base) {
      yield this.base
      yield* this.base.dependencies()
    }
  }

  toString(): string {
    return `ShardedArray(${formatShape(this.shape)}, ${this.dtype}, ${this.sharding.spec})`
  }
}

export const isShardedArray: IsLeaf<ShardedArray> = (x): x is ShardedArray => x instanceof ShardedArray

const sliceKey = (s: Slice) => `${s.offsets.join(",")}|${s.shape.join(",")}`

/** Allocates one uninitialised buffer per mesh position for an array of this sharding. */
export const allocateArray = (
  engine: Engine,
  shape: Shape,
  dtype: DType,
  sharding: NamedSharding,
  partial: ReadonlyArray<string> = [],
): ShardedArray => {
  const bytes = numel(sharding.shardShape(shape)) * itemSize(dtype)
  const buffers: BufferId[] = []
  try {
    for (const device of sharding.mesh.devices) buffers.push(engine.allocate(device, bytes))
  } catch (e) {
    for (const b of buffers) engine.backend.free(b)
    throw e
  }
  return new ShardedArray(engine, [...shape], dtype, sharding, buffers, partial)
}

const describe = (a: ArrayBufferView) => `${a.constructor.name} of ${a.byteLength} bytes`

/** Mesh positions grouped by the block they hold (replicas share a group). */
export const slicesByBlock = (
  sharding: NamedSharding,
  shape: Shape,
): Array<{ slice: Slice; positions: number[] }> => {
  const groups = new Map<string, { slice: Slice; positions: number[] }>()
  for (let p = 0; p < sharding.mesh.size; p++) {
    const slice = sharding.slice(p, shape)
    const key = sliceKey(slice)
    const g = groups.get(key)
    if (g) g.positions.push(p)
    else groups.set(key, { slice, positions: [p] })
  }
  return [...groups.values()]
}

/**
 * Builds an array from host data produced one distinct block at a time (each device receives
 * only its own block; replicas share one read). `read(slice)` yields that block, row-major, in
 * `dtype`. Only one block is held on the host at a time.
 */
export const makeArrayFromSlices = <E, R>(
  engine: Engine,
  shape: Shape,
  dtype: DType,
  sharding: NamedSharding,
  read: (slice: Slice) => Effect.Effect<ArrayBufferView, E, R>,
  name = "array",
): Effect.Effect<ShardedArray, ShardingError | HostDataMismatch | E, R> =>
  Effect.gen(function* () {
    yield* sharding.validate(shape, name)
    const arr = allocateArray(engine, shape, dtype, sharding)
    const bytes = arr.bytesPerDevice
    return yield* Effect.gen(function* () {
      for (const { slice, positions } of slicesByBlock(sharding, shape)) {
        const block = yield* read(slice)
        if (block.byteLength !== bytes)
          return yield* new HostDataMismatch({
            what: `${name}: block at ${formatShape(slice.offsets)} of shape ${formatShape(slice.shape)}`,
            expected: `${bytes} bytes of ${dtype}`,
            got: describe(block),
          })
        for (const p of positions) engine.backend.write(arr.buffer(p), 0, block)
      }
      return arr
    }).pipe(
      Effect.onExit((exit) => (exit._tag === "Failure" ? Effect.sync(() => arr.dispose()) : Effect.void)),
    )
  })

/** makeArrayFromSlices with a synchronous callback (jax.make_array_from_callback). */
export const makeArrayFromCallback = (
  engine: Engine,
  shape: Shape,
  dtype: DType,
  sharding: NamedSharding,
  data: (slice: Slice) => ArrayBufferView,
  name = "array",
): Effect.Effect<ShardedArray, ShardingError | HostDataMismatch> =>
  makeArrayFromSlices(engine, shape, dtype, sharding, (s) => Effect.sync(() => data(s)), name)

/** Copies the block `box` (global offsets/shape) of a row-major host array into a new host array. */
export const sliceHost = (
  engine: Engine,
  src: ArrayBufferView,
  shape: Shape,
  dtype: DType,
  slice: Slice,
): HostArray => {
  const out = hostArray(dtype, numel(slice.shape))
  engine.backend.hostCopyBox(
    src,
    out,
    itemSize(dtype),
    boxArgs(
      shape,
      slice.offsets,
      slice.shape,
      slice.shape.map(() => 0),
      slice.shape,
    ),
  )
  return out
}

/** An array holding a row-major host array, placed by `sharding`. */
export const fromHost = (
  engine: Engine,
  data: ArrayBufferView,
  shape: Shape,
  dtype: DType,
  sharding: NamedSharding,
  name = "array",
): Effect.Effect<ShardedArray, ShardingError | HostDataMismatch> =>
  data.byteLength !== numel(shape) * itemSize(dtype)
    ? Effect.fail(
        new HostDataMismatch({
          what: `${name} of shape ${formatShape(shape)}`,
          expected: `${numel(shape) * itemSize(dtype)} bytes of ${dtype}`,
          got: describe(data),
        }),
      )
    : makeArrayFromCallback(
        engine,
        shape,
        dtype,
        sharding,
        (s) => sliceHost(engine, data, shape, dtype, s),
        name,
      )

/** Reads a whole array back to the host, row-major (each block read once, from one replica). */
export const toHost = (arr: ShardedArray): HostArray => {
  if (arr.partial.length > 0)
    throw new Error(`toHost of an array still partial over (${arr.partial.join(", ")})`)
  const out = hostArray(arr.dtype, arr.size)
  const esize = itemSize(arr.dtype)
  const done = new Set<string>()
  const backend = arr.engine.backend
  for (let p = 0; p < arr.mesh.size; p++) {
    const slice = arr.sharding.slice(p, arr.shape)
    const key = sliceKey(slice)
    if (done.has(key)) continue
    done.add(key)
    const block = backend.read(arr.buffer(p), 0, arr.bytesPerDevice)
    backend.hostCopyBox(
      block,
      out,
      esize,
      boxArgs(
        slice.shape,
        slice.shape.map(() => 0),
        arr.shape,
        slice.offsets,
        slice.shape,
      ),
    )
  }
  return out
}

/** Reads one mesh position's block. */
export const shardToHost = (arr: ShardedArray, position: number): HostArray => {
  const out = hostArray(arr.dtype, numel(arr.localShape))
  arr.engine.backend.read(arr.buffer(position), 0, arr.bytesPerDevice, out)
  return out
}

/**
 * shardToHost in two halves: the copy is queued now, behind the work queued so far, and the
 * returned finish waits for that work only (not for what is queued after the call). Where the
 * backend has no such read, the read happens now and the finish hands it over.
 */
export const shardToHostLater = (arr: ShardedArray, position: number): (() => HostArray) => {
  const later = arr.engine.backend.readLater?.(arr.buffer(position), 0, arr.bytesPerDevice)
  if (!later) {
    const now = shardToHost(arr, position)
    return () => now
  }
  return () => {
    const out = hostArray(arr.dtype, numel(arr.localShape))
    new Uint8Array(out.buffer, out.byteOffset, out.byteLength).set(later())
    return out
  }
}

const intersect = (a: Slice, b: Slice): Slice | undefined => {
  const offsets: number[] = []
  const shape: number[] = []
  for (let d = 0; d < a.shape.length; d++) {
    const lo = Math.max(a.offsets[d]!, b.offsets[d]!)
    const hi = Math.min(a.offsets[d]! + a.shape[d]!, b.offsets[d]! + b.shape[d]!)
    if (hi <= lo) return undefined
    offsets.push(lo)
    shape.push(hi - lo)
  }
  return { offsets, shape }
}

/**
 * The same array under another sharding of the same mesh devices: every new block is assembled
 * from the overlapping old blocks, device to device (a replica on the same device preferred).
 */
export const reshard = (
  arr: ShardedArray,
  target: NamedSharding,
  name = "array",
): Effect.Effect<ShardedArray, ShardingError> =>
  Effect.gen(function* () {
    yield* target.validate(arr.shape, name)
    if (arr.partial.length > 0) throw new Error("reshard of a partial array")
    const out = allocateArray(arr.engine, arr.shape, arr.dtype, target)
    try {
      copyOverlaps(arr, out)
    } catch (e) {
      out.dispose()
      throw e
    }
    return out
  })

/** Fills `dst` from the overlapping blocks of `src` (same global shape and dtype). */
export const copyOverlaps = (src: ShardedArray, dst: ShardedArray): void => {
  const esize = itemSize(src.dtype)
  const srcLocal = src.localShape
  const dstLocal = dst.localShape
  const blocks = slicesByBlock(src.sharding, src.shape)
  for (let q = 0; q < dst.mesh.size; q++) {
    const want = dst.sharding.slice(q, dst.shape)
    const device = dst.mesh.devices[q]!
    for (const { slice, positions } of blocks) {
      const box = intersect(slice, want)
      if (!box) continue
      const from = positions.find((p) => src.mesh.devices[p] === device) ?? positions[0]!
      const srcStart = box.offsets.map((o, d) => o - slice.offsets[d]!)
      const dstStart = box.offsets.map((o, d) => o - want.offsets[d]!)
      src.engine.backend.exec(
        "copy_box",
        [src.buffer(from), dst.buffer(q)],
        [esize, ...boxArgs(srcLocal, srcStart, dstLocal, dstStart, box.shape)],
      )
    }
  }
}

/** The sharding of every array in a tree (Magix's item_sharding), e.g. for a jit's outShardings. */
export const itemSharding = (tree: Tree<ShardedArray>): Tree<NamedSharding> =>
  mapWithPath(tree, isShardedArray, (_, a) => a.sharding)
