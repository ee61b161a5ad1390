/**
 * The devices a program runs on, as a service. CpuRuntime gives N virtual CPU devices (each
 * with its own buffers and an optional memory limit); CudaRuntime the GPUs, failing with
 * NoGpuFound where there are none; DefaultRuntime picks CUDA when a GPU is present.
 */
import { Context, Effect, Layer, type Scope } from "effect"
import type { Backend, BufferId, MemoryStats } from "../core/backend.ts"
import type { CollectiveBackend } from "../core/collectives.ts"
import { Engine } from "../core/engine.ts"
import { attempt, type DeviceOutOfMemory, NoGpuFound } from "../core/errors.ts"
import { type Mesh, type MeshError, makeMesh } from "../core/mesh.ts"
import { loadNative, type NativeAddonError, type NativeBackend } from "../native/index.ts"
import { adaptNativeBackend } from "./nativeBackend.ts"

export interface DeviceInfo {
  readonly index: number
  readonly name: string
  /** Bytes the device may hold; 0 where unlimited (a CPU device without memoryPerDevice). */
  readonly memory: number
}

/** A raw device buffer held for the life of a scope. */
export interface DeviceBuffer {
  readonly id: BufferId
  readonly device: number
  readonly bytes: number
}

export class Devices extends Context.Service<
  Devices,
  {
    readonly platform: "cpu" | "cuda"
    readonly count: number
    readonly info: ReadonlyArray<DeviceInfo>
    readonly backend: Backend
    readonly engine: Engine
    /** A buffer released when the scope closes (on success, failure or interruption). */
    readonly allocate: (
      device: number,
      bytes: number,
    ) => Effect.Effect<DeviceBuffer, DeviceOutOfMemory, Scope.Scope>
    readonly memory: (device: number) => Effect.Effect<MemoryStats>
    readonly resetPeak: (device: number) => Effect.Effect<void>
  }
>()("magix/Devices") {}

const makeDevices = (
  native: NativeBackend,
  backend: Backend,
  info: ReadonlyArray<DeviceInfo>,
  comms?: CollectiveBackend,
) =>
  Devices.of({
    platform: backend.platform,
    count: backend.deviceCount,
    info,
    backend,
    engine: new Engine(backend, comms),
    allocate: (device, bytes) =>
      Effect.acquireRelease(
        attempt(() => ({ id: backend.alloc(device, bytes), device, bytes })) as Effect.Effect<
          DeviceBuffer,
          DeviceOutOfMemory
        >,
        (b) => Effect.sync(() => backend.free(b.id)),
      ),
    memory: (device) => Effect.sync(() => backend.stats(device)),
    resetPeak: (device) => Effect.sync(() => native.resetPeak(device)),
  })

/**
 * NCCL communicators for the CUDA runtime, one per group of a mesh's positions over some axes,
 * made on first use and destroyed when the runtime's scope closes.
 */
const ncclCommunicators = (native: NativeBackend) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const made = new Map<string, number>()
      const comms: CollectiveBackend & { readonly made: Map<string, number> } = {
        made,
        communicator: (key) => {
          const devices = key.mesh.groups(key.axes)[key.group]!.map((p) => key.mesh.devices[p]!)
          const id = devices.join(",")
          let comm = made.get(id)
          if (comm === undefined) {
            comm = devices.length > 1 ? native.createCommunicator(devices) : 0
            made.set(id, comm)
          }
          return comm
        },
      }
      return comms
    }),
    (c) =>
      Effect.sync(() => {
        for (const id of c.made.values()) if (id > 0) native.destroyCommunicator(id)
      }),
  )

const backendResource = (create: () => NativeBackend) =>
  Effect.acquireRelease(Effect.sync(create), (b) => Effect.sync(() => b.dispose()))

export interface CpuRuntimeOptions {
  /** Number of virtual devices (default 1). */
  readonly devices?: number
  /** A memory limit per device in bytes; exceeding it is DeviceOutOfMemory. */
  readonly memoryPerDevice?: number
}

const loadAddon = Effect.try({ try: loadNative, catch: (e) => e as NativeAddonError })

/** N virtual CPU devices in this process. */
export const CpuRuntime = (options: CpuRuntimeOptions = {}): Layer.Layer<Devices, NativeAddonError> =>
  Layer.effect(
    Devices,
    Effect.gen(function* () {
      const devices = options.devices ?? 1
      if (!Number.isInteger(devices) || devices < 1)
        return yield* Effect.die(new Error("CpuRuntime: devices must be a positive integer"))
      const addon = yield* loadAddon
      const native = yield* backendResource(() => addon.createCpu(devices))
      const memory = options.memoryPerDevice ?? 0
      for (let d = 0; d < devices; d++) native.setCapacity(d, memory)
      const info = Array.from({ length: devices }, (_, index) => ({ index, name: `cpu:${index}`, memory }))
      return makeDevices(native, adaptNativeBackend(addon, native), info)
    }),
  )

/** Every GPU the CUDA runtime sees (or the first `devices`). */
export const CudaRuntimeWith = (
  options: { readonly devices?: number } = {},
): Layer.Layer<Devices, NoGpuFound | NativeAddonError> =>
  Layer.effect(
    Devices,
    Effect.gen(function* () {
      const addon = yield* loadAddon
      const probe = addon.cudaProbe()
      if (!probe.built) return yield* new NoGpuFound({ reason: probe.error })
      if (probe.devices === 0)
        return yield* new NoGpuFound({ reason: probe.error || "the CUDA runtime sees no device" })
      if (options.devices !== undefined && (options.devices < 1 || options.devices > probe.devices))
        return yield* new NoGpuFound({
          reason: `asked for ${options.devices} GPUs, ${probe.devices} present`,
        })
      const native = yield* backendResource(() => addon.createCuda(options.devices))
      const info = probe.gpus
        .slice(0, native.deviceCount)
        .map((g, index) => ({ index, name: g.name, memory: g.totalMemory }))
      const comms = yield* ncclCommunicators(native)
      return makeDevices(native, adaptNativeBackend(addon, native), info, comms)
    }),
  )

export const CudaRuntime: Layer.Layer<Devices, NoGpuFound | NativeAddonError> = CudaRuntimeWith()

/** True where the addon was built with CUDA and a GPU is usable. */
export const gpuAvailable = (): boolean => {
  try {
    return loadNative().cudaProbe().devices > 0
  } catch {
    return false
  }
}

/** CUDA when a GPU is present, else one CPU device (or `cpu` options). */
export const DefaultRuntime = (cpu: CpuRuntimeOptions = {}): Layer.Layer<Devices, NativeAddonError> =>
  Layer.unwrap(
    Effect.sync(() =>
      gpuAvailable() ? CudaRuntime.pipe(Layer.catchCause(() => CpuRuntime(cpu))) : CpuRuntime(cpu),
    ),
  )

/** Magix's create_device_mesh: the devices in a named grid; -1 takes what is left (at most one). */
export const createDeviceMesh = (
  shape: ReadonlyArray<number>,
  names: ReadonlyArray<string> = ["data", "model"],
): Effect.Effect<Mesh, MeshError, Devices> =>
  Effect.gen(function* () {
    const devices = yield* Devices
    return yield* makeMesh(
      Array.from({ length: devices.count }, (_, i) => i),
      shape,
      names,
    )
  })
