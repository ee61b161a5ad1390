/**
 * Errors any layer can raise about devices and native work. Errors tied to one concept (mesh,
 * sharding, safetensors...) live in that concept's module.
 */
import { Effect, Schema } from "effect"

const gib = (n: number) => `${(n / 2 ** 30).toFixed(2)} GiB`
export const formatBytes = (n: number): string =>
  n >= 2 ** 30 ? gib(n) : n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${n} bytes`

export class DeviceOutOfMemory extends Schema.TaggedError<DeviceOutOfMemory>()("DeviceOutOfMemory", {
  device: Schema.Number,
  requested: Schema.Number,
  free: Schema.Number,
  inUse: Schema.Number,
  capacity: Schema.Number,
  largest: Schema.optional(Schema.String),
}) {
  override get message() {
    const cap = this.capacity > 0 ? ` of ${formatBytes(this.capacity)}` : ""
    const largest = this.largest ? `; largest allocations: ${this.largest}` : ""
    return (
      `device ${this.device} is out of memory: asked for ${formatBytes(this.requested)}, ` +
      `${formatBytes(this.free)} free (${formatBytes(this.inUse)} in use${cap})${largest}. ` +
      "Use a smaller batch, shard over more devices, or turn on activation recomputation."
    )
  }
}

/** A CUDA runtime, cuBLASLt or NCCL call failed. */
export class CudaError extends Schema.TaggedError<CudaError>()("CudaError", {
  library: Schema.String,
  status: Schema.Number,
  name: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `${this.library} error ${this.status} (${this.name}): ${this.detail}`
  }
}

/** CudaRuntime was asked for but no GPU (or no driver) is usable. */
export class NoGpuFound extends Schema.TaggedError<NoGpuFound>()("NoGpuFound", {
  reason: Schema.String,
}) {
  override get message() {
    return `no usable NVIDIA GPU: ${this.reason}. Use Magix.CpuRuntime({ devices: N }) (or --cpu-devices N) to run on the CPU.`
  }
}

/** A native op was called with arguments that contradict its buffers: a bug in Magix, not user input. */
export class NativeInvariantViolation extends Schema.TaggedError<NativeInvariantViolation>()(
  "NativeInvariantViolation",
  { detail: Schema.String },
) {
  override get message() {
    return `internal error in the native engine: ${this.detail} (please report it)`
  }
}

export type DeviceError = DeviceOutOfMemory | CudaError | NativeInvariantViolation

const deviceErrorTags = new Set(["DeviceOutOfMemory", "CudaError", "NativeInvariantViolation"])

/** True for the device errors that synchronous engine code throws. */
export const isDeviceError = (e: unknown): e is DeviceError =>
  typeof e === "object" && e !== null && deviceErrorTags.has((e as { _tag?: string })._tag ?? "")

/**
 * Runs synchronous engine code as an Effect: thrown device errors become typed failures,
 * anything else a defect.
 */
export const attempt = <A>(f: () => A): Effect.Effect<A, DeviceError> =>
  Effect.suspend(() => {
    try {
      return Effect.succeed(f())
    } catch (e) {
      return isDeviceError(e) ? Effect.fail(e) : Effect.die(e)
    }
  })
