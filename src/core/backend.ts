/**
 * The op table as the core sees it. The native addon implements it for CPU and CUDA; a layer
 * hands one to the program, so nothing in src/core depends on native code and any backend
 * (a mock in tests) can stand in.
 */
export type BufferId = number

export interface MemoryStats {
  /** Bytes held by live buffers. */
  readonly inUse: number
  /** Most bytes held at once since the device was created or its peak was reset. */
  readonly peak: number
  /** The device's limit in bytes; 0 where only the hardware limits it. */
  readonly capacity: number
  /** Live buffers. */
  readonly count: number
}

export interface Backend {
  readonly platform: "cpu" | "cuda"
  readonly deviceCount: number
  /** Throws DeviceOutOfMemory when the device cannot hold `bytes` more. */
  alloc(device: number, bytes: number): BufferId
  free(id: BufferId): void
  write(id: BufferId, offset: number, data: ArrayBufferView): void
  read(id: BufferId, offset: number, length: number, out?: ArrayBufferView): Uint8Array
  /**
   * Starts a read behind the work queued so far and returns its finish, which waits for that
   * work only (not for what was queued after the start): read step i's loss while step i + 1
   * runs. Where absent, read.
   */
  readLater?(id: BufferId, offset: number, length: number): () => Uint8Array
  copy(dst: BufferId, dstOffset: number, src: BufferId, srcOffset: number, bytes: number): void
  stats(device: number): MemoryStats
  resetPeak(device: number): void
  synchronize(device: number): void
  hasOp(op: string): boolean
  /** Runs (on CUDA: enqueues) one op over buffers with numeric arguments. */
  exec(op: string, buffers: ReadonlyArray<BufferId>, args: ReadonlyArray<number>): void
  /** Copies a box between two host arrays (see boxArgs). */
  hostCopyBox(src: ArrayBufferView, dst: ArrayBufferView, elemSize: number, box: ReadonlyArray<number>): void
  /** Graph capture and replay, where the backend has it (both native backends do). */
  readonly graphs?: Graphs
}

export type GraphId = number

/**
 * Between `begin` and `end`, `exec` and `copy` are recorded instead of run (a CUDA graph on the
 * GPU, an op list on the CPU) and `launch` runs the record again over the same buffers, with no
 * per-op host work. Buffers freed during the capture keep their memory in the graph (later
 * allocations of the capture reuse it) until `destroy`; every other buffer the record touches
 * must stay live (`launch` checks). `write` and `read` are refused while capturing: a captured
 * stretch never synchronises the host, which is what a successful capture proves.
 */
export interface Graphs {
  begin(): void
  end(): GraphId
  /** Ends a capture that failed part-way, keeping nothing. */
  abort(): void
  launch(id: GraphId): void
  destroy(id: GraphId): void
  /** Nodes (kernels, copies, collectives; ops on the CPU) one launch runs. */
  nodes(id: GraphId): number
  /**
   * A buffer id for bytes [offset, offset + bytes) of `buffer` that owns nothing: freeing it frees
   * no memory, and `buffer` must outlive it. A capture places its short-lived buffers in one
   * block this way, at offsets planned from their lifetimes.
   */
  alias(buffer: BufferId, offset: number, bytes: number): BufferId
}

/**
 * The argument list of a box copy: rank, source shape, source start, destination shape,
 * destination start, box shape.
 */
export const boxArgs = (
  srcShape: ReadonlyArray<number>,
  srcStart: ReadonlyArray<number>,
  dstShape: ReadonlyArray<number>,
  dstStart: ReadonlyArray<number>,
  box: ReadonlyArray<number>,
): number[] => [srcShape.length, ...srcShape, ...srcStart, ...dstShape, ...dstStart, ...box]
