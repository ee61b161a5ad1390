import { Effect, Exit, Layer, Scope } from "effect"
import { describe, expect, it } from "vitest"
import {
  CpuRuntime,
  CudaRuntime,
  createDeviceMesh,
  DefaultRuntime,
  Devices,
  gpuAvailable,
} from "../../src/layers/Devices.ts"

const runCpu = <A, E>(e: Effect.Effect<A, E, Devices>, devices = 4, memoryPerDevice?: number) =>
  Effect.runPromise(
    e.pipe(
      Effect.provide(CpuRuntime(memoryPerDevice === undefined ? { devices } : { devices, memoryPerDevice })),
    ),
  )

describe("CpuRuntime", () => {
  it("gives N virtual devices with their own accounting", async () => {
    const stats = await runCpu(
      Effect.gen(function* () {
        const d = yield* Devices
        expect(d.platform).toBe("cpu")
        expect(d.count).toBe(4)
        return yield* Effect.scoped(
          Effect.gen(function* () {
            yield* d.allocate(1, 1000)
            yield* d.allocate(1, 24)
            yield* d.allocate(3, 4096)
            return yield* Effect.all([0, 1, 2, 3].map((i) => d.memory(i)))
          }),
        )
      }),
    )
    expect(stats.map((s) => s.inUse)).toEqual([0, 1024, 0, 4096])
    expect(stats[1]!.count).toBe(2)
  })

  it("releases buffers when the scope closes, on success, failure and interruption; keeps the peak", async () => {
    await runCpu(
      Effect.gen(function* () {
        const d = yield* Devices
        yield* Effect.scoped(d.allocate(0, 500))
        expect((yield* d.memory(0)).inUse).toBe(0)
        expect((yield* d.memory(0)).peak).toBe(500)
        const failed = yield* Effect.exit(
          Effect.scoped(
            Effect.gen(function* () {
              yield* d.allocate(0, 300)
              return yield* Effect.fail("boom")
            }),
          ),
        )
        expect(Exit.isFailure(failed)).toBe(true)
        expect((yield* d.memory(0)).inUse).toBe(0)
        const scope = yield* Scope.make()
        yield* d.allocate(0, 700).pipe(Scope.provide(scope))
        expect((yield* d.memory(0)).inUse).toBe(700)
        yield* Scope.close(scope, Exit.interrupt(0))
        expect((yield* d.memory(0)).inUse).toBe(0)
        yield* d.resetPeak(0)
        expect((yield* d.memory(0)).peak).toBe(0)
      }),
    )
  })

  it("exceeding memoryPerDevice is DeviceOutOfMemory with the bytes requested and free", async () => {
    const err = await runCpu(
      Effect.gen(function* () {
        const d = yield* Devices
        return yield* Effect.scoped(
          Effect.gen(function* () {
            yield* d.allocate(2, 600)
            return yield* Effect.flip(d.allocate(2, 500))
          }),
        )
      }),
      4,
      1000,
    )
    expect(err._tag).toBe("DeviceOutOfMemory")
    expect(err.device).toBe(2)
    expect(err.requested).toBe(500)
    expect(err.free).toBe(400)
    expect(err.message).toContain("device 2 is out of memory")
  })

  it("builds a named mesh over its devices", async () => {
    const mesh = await runCpu(createDeviceMesh([2, -1]))
    expect(mesh.shape).toEqual([2, 2])
    expect(mesh.devices).toEqual([0, 1, 2, 3])
    const err = await runCpu(Effect.flip(createDeviceMesh([3, -1])))
    expect(err._tag).toBe("InvalidMeshShape")
  })
})

describe("CudaRuntime", () => {
  it.skipIf(gpuAvailable())(
    "fails with NoGpuFound where there is no GPU, suggesting the CPU runtime",
    async () => {
      const err = await Effect.runPromise(Effect.flip(Layer.build(CudaRuntime).pipe(Effect.scoped)))
      expect(err._tag).toBe("NoGpuFound")
      expect(err.message).toContain("CpuRuntime")
    },
  )

  it("the default runtime picks the CPU where there is no GPU", async () => {
    const platform = await Effect.runPromise(
      Effect.map(Devices, (d) => d.platform).pipe(Effect.provide(DefaultRuntime({ devices: 2 }))),
    )
    expect(platform).toBe(gpuAvailable() ? "cuda" : "cpu")
  })
})
