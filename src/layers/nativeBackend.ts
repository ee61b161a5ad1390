/**
 * Adapts a native backend object to the core's Backend: op names resolved to codes once, and
 * native error codes turned into the typed errors of src/core/errors.ts.
 */
import type { Backend, BufferId, MemoryStats } from "../core/backend.ts"
import { CudaError, DeviceOutOfMemory, NativeInvariantViolation } from "../core/errors.ts"
import type { NativeAddon, NativeBackend, NativeErrorFields } from "../native/index.ts"

const num = (v: unknown) => (typeof v === "number" ? v : 0)
const str = (v: unknown) => (typeof v === "string" ? v : "")

/** The typed error for a native failure; unknown failures pass through unchanged. */
export const translateNativeError = (e: unknown): unknown => {
  if (!(e instanceof Error)) return e
  const f = e as Error & NativeErrorFields
  switch (f.code) {
    case "OUT_OF_MEMORY":
      return new DeviceOutOfMemory({
        device: num(f.device),
        requested: num(f.requested),
        free: num(f.free),
        inUse: num(f.inUse),
        capacity: num(f.capacity),
        ...(typeof f.largest === "string" ? { largest: f.largest } : {}),
      })
    case "CUDA_ERROR":
    case "GRAPH_CAPTURE_FAILED":
    case "CUBLAS_ERROR":
    case "NCCL_ERROR":
      return new CudaError({
        library: str(f.library) || "cuda",
        status: num(f.status),
        name: str(f.name) || str(f.code),
        detail: e.message,
      })
    case "INVALID_ARGUMENT":
    case "NATIVE_ERROR":
    case "DISPOSED":
      return new NativeInvariantViolation({ detail: e.message })
    default:
      return e
  }
}

const guard = <A>(f: () => A): A => {
  try {
    return f()
  } catch (e) {
    throw translateNativeError(e)
  }
}

export const adaptNativeBackend = (addon: NativeAddon, native: NativeBackend): Backend => {
  const codes = new Map(native.opNames().map((n, i) => [n, i]))
  const code = (op: string) => {
    const c = codes.get(op)
    if (c === undefined)
      throw new NativeInvariantViolation({
        detail: `the ${native.kind} backend has no op "${op}" (rebuild the addon?)`,
      })
    return c
  }
  return {
    platform: native.kind,
    deviceCount: native.deviceCount,
    alloc: (device, bytes) => guard(() => native.alloc(device, bytes)),
    // After the runtime is released every buffer went with it: a late dispose has nothing to do.
    free: (id: BufferId) =>
      guard(() => {
        try {
          native.free(id)
        } catch (e) {
          if ((e as NativeErrorFields).code !== "DISPOSED") throw e
        }
      }),
    write: (id, offset, data) => guard(() => native.write(id, offset, data)),
    read: (id, offset, length, out) => guard(() => native.read(id, offset, length, out)),
    readLater: (id, offset, length) => {
      const ticket = guard(() => native.readStart(id, offset, length))
      return () => guard(() => native.readFinish(ticket, length))
    },
    copy: (dst, dstOffset, src, srcOffset, bytes) =>
      guard(() => native.copy(dst, dstOffset, src, srcOffset, bytes)),
    stats: (device): MemoryStats => guard(() => native.stats(device)),
    resetPeak: (device) => guard(() => native.resetPeak(device)),
    synchronize: (device) => guard(() => native.synchronize(device)),
    hasOp: (op) => codes.has(op),
    exec: (op, buffers, args) => guard(() => native.exec(code(op), buffers, args)),
    hostCopyBox: (src, dst, elemSize, box) => guard(() => addon.copyBox(src, dst, elemSize, box)),
    graphs: {
      begin: () => guard(() => native.captureBegin()),
      end: () => guard(() => native.captureEnd()),
      abort: () => guard(() => native.captureAbort()),
      launch: (id) => guard(() => native.graphLaunch(id)),
      destroy: (id) => guard(() => native.graphDestroy(id)),
      nodes: (id) => guard(() => native.graphNodes(id)),
      alias: (buffer, offset, bytes) => guard(() => native.alias(buffer, offset, bytes)),
    },
  }
}
