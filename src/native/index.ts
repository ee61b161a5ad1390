/**
 * The typed loader of the native addon (build/Release/magix.node). Loading fails with a typed
 * error that says how to rebuild: missing, built for another platform or Node, or older than
 * these sources.
 */
import { existsSync, readFileSync } from "node:fs"
import { createRequire } from "node:module"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { Schema } from "effect"

export interface NativeMemoryStats {
  readonly inUse: number
  readonly peak: number
  readonly capacity: number
  readonly count: number
}

/** A backend object of the addon: buffer ids are plain numbers checked by a native table. */
export interface NativeBackend {
  readonly kind: "cpu" | "cuda"
  readonly deviceCount: number
  alloc(device: number, bytes: number): number
  /** A view of bytes [offset, offset + bytes) of buffer `id` that owns nothing (see backend.h). */
  alias(id: number, offset: number, bytes: number): number
  free(id: number): void
  freeAll(): void
  size(id: number): { bytes: number; device: number }
  write(id: number, offset: number, data: ArrayBufferView): void
  read(id: number, offset: number, length: number, out?: ArrayBufferView): Uint8Array
  /** A read in two halves (see common/backend.h): the ticket waits only for work queued before it. */
  readStart(id: number, offset: number, length: number): number
  readFinish(ticket: number, length: number): Uint8Array
  copy(dst: number, dstOffset: number, src: number, srcOffset: number, bytes: number): void
  stats(device: number): NativeMemoryStats
  resetPeak(device: number): void
  setCapacity(device: number, bytes: number): void
  synchronize(device: number): void
  opNames(): string[]
  exec(op: number, buffers: ReadonlyArray<number>, args: ReadonlyArray<number> | Float64Array): void
  dispose(): void
  /**
   * An NCCL communicator over these GPUs, rank i on devices[i] (0 on the CPU, which needs none).
   * Collective ops take its id as `comm`; `comm` 0 on CUDA means the device list's own
   * communicator, made on first use and kept until the backend is disposed.
   */
  createCommunicator(devices: ReadonlyArray<number>): number
  destroyCommunicator(id: number): void
  /** Graph capture and replay (src/native/common/backend.h; core/backend.ts Graphs). */
  captureBegin(): void
  captureEnd(): number
  captureAbort(): void
  graphLaunch(id: number): void
  graphDestroy(id: number): void
  graphNodes(id: number): number
}

export interface GpuInfo {
  readonly name: string
  readonly totalMemory: number
  readonly computeCapability: string
  readonly multiprocessors: number
}

export interface CudaProbe {
  readonly built: boolean
  readonly devices: number
  readonly error: string
  readonly gpus: ReadonlyArray<GpuInfo>
  readonly runtimeVersion?: number
  readonly driverVersion?: number
  /** cuBLASLt version, or why it could not be opened. */
  readonly cublasLt?: number | string
  /** NCCL version, or why it could not be opened. */
  readonly nccl?: number | string
}

export interface NativeAddon {
  createCpu(devices: number): NativeBackend
  createCuda(devices?: number): NativeBackend
  cudaProbe(): CudaProbe
  /** Copies a box between host arrays: args are rank, srcShape, srcStart, dstShape, dstStart, box. */
  copyBox(src: ArrayBufferView, dst: ArrayBufferView, elemSize: number, box: ReadonlyArray<number>): void
  cpuThreads(): number
  /**
   * Host memory for large device transfers, freed when collected: pinned where `pinned` and a GPU
   * takes it, else huge-page-advised pageable memory (fresh pages fault in faster). Its contents
   * are unspecified (as Buffer.allocUnsafe's).
   */
  hostBuffer(bytes: number, pinned?: boolean): ArrayBuffer
  readonly abiVersion: number
  readonly withCuda: boolean
}

/** Fields every native error carries: a machine-readable code plus numeric details. */
export interface NativeErrorFields {
  readonly code?: string
  readonly [field: string]: unknown
}

const rebuildHint =
  "rebuild it with `npm run build:native` (or `npm install`), which needs cmake and a C++17 compiler"

export class NativeAddonMissing extends Schema.TaggedError<NativeAddonMissing>()("NativeAddonMissing", {
  path: Schema.String,
}) {
  override get message() {
    return `the native addon is missing at ${this.path}: ${rebuildHint}`
  }
}

export class NativeAddonIncompatible extends Schema.TaggedError<NativeAddonIncompatible>()(
  "NativeAddonIncompatible",
  {
    path: Schema.String,
    detail: Schema.String,
  },
) {
  override get message() {
    return (
      `the native addon at ${this.path} cannot be loaded by this Node.js (${process.version}, ${process.platform}-${process.arch}); ` +
      `it was probably built for another platform or Node ABI: ${rebuildHint}. Loader said: ${this.detail}`
    )
  }
}

export class NativeAddonStale extends Schema.TaggedError<NativeAddonStale>()("NativeAddonStale", {
  path: Schema.String,
  built: Schema.Number,
  expected: Schema.Number,
}) {
  override get message() {
    return `the native addon at ${this.path} was built from older sources (ABI ${this.built}, these sources need ${this.expected}): ${rebuildHint}`
  }
}

export type NativeAddonError = NativeAddonMissing | NativeAddonIncompatible | NativeAddonStale

const here = dirname(fileURLToPath(import.meta.url))
export const addonPath = (): string =>
  process.env.MAGIX_NATIVE_PATH ?? join(here, "..", "..", "build", "Release", "magix.node")
const expectedAbi = (): number => Number(readFileSync(join(here, "ABI_VERSION"), "utf8").trim())

let cached: NativeAddon | undefined

/** Loads the addon once; throws a NativeAddonError describing how to fix a failed load. */
export const loadNative = (): NativeAddon => {
  if (cached) return cached
  const path = addonPath()
  if (!existsSync(path)) throw new NativeAddonMissing({ path })
  let addon: NativeAddon
  try {
    addon = createRequire(import.meta.url)(path) as NativeAddon
  } catch (e) {
    throw new NativeAddonIncompatible({ path, detail: e instanceof Error ? e.message : String(e) })
  }
  const expected = expectedAbi()
  if (addon.abiVersion !== expected) throw new NativeAddonStale({ path, built: addon.abiVersion, expected })
  cached = addon
  return addon
}
