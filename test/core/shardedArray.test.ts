import { Effect } from "effect"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import type { DType } from "../../src/core/dtype.ts"
import { type Mesh, makeMesh } from "../../src/core/mesh.ts"
import {
  fromHost,
  itemSharding,
  makeArrayFromCallback,
  reshard,
  shardToHost,
  toHost,
} from "../../src/core/shardedArray.ts"
import { NamedSharding, P, PartitionSpec, type Slice } from "../../src/core/sharding.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"

const withDevices = <A, E>(n: number, f: (d: Devices["Service"]) => Effect.Effect<A, E>) =>
  Effect.runPromise(Effect.flatMap(Devices, f).pipe(Effect.provide(CpuRuntime({ devices: n }))))

const meshOf = (n: number, shape: number[], names = ["data", "model"]) =>
  Effect.runSync(
    makeMesh(
      Array.from({ length: n }, (_, i) => i),
      shape,
      names,
    ),
  )

const iota = (n: number) => Float32Array.from({ length: n }, (_, i) => i + 0.5)

describe("sharded arrays", () => {
  it("each device holds exactly its slice, asserted through per-device bytes", async () => {
    await withDevices(4, (d) =>
      Effect.gen(function* () {
        const mesh = meshOf(4, [2, 2])
        const data = iota(8 * 6)
        const arr = yield* fromHost(
          d.engine,
          data,
          [8, 6],
          "float32",
          new NamedSharding(mesh, P("data", "model")),
        )
        for (let dev = 0; dev < 4; dev++) expect((yield* d.memory(dev)).inUse).toBe(4 * 3 * 4)
        // device (data=1, model=0) holds rows 4..7, columns 0..2
        const block = shardToHost(arr, mesh.position([1, 0])) as Float32Array
        expect(Array.from(block)).toEqual(
          [24, 25, 26, 30, 31, 32, 36, 37, 38, 42, 43, 44].map((v) => v + 0.5),
        )
        expect(Array.from(toHost(arr) as Float32Array)).toEqual(Array.from(data))
        const replicated = yield* fromHost(
          d.engine,
          data,
          [8, 6],
          "float32",
          new NamedSharding(mesh, P(null, "model")),
        )
        for (let dev = 0; dev < 4; dev++) expect((yield* d.memory(dev)).inUse).toBe(4 * 3 * 4 + 8 * 3 * 4)
        arr.dispose()
        replicated.dispose()
        for (let dev = 0; dev < 4; dev++) expect((yield* d.memory(dev)).inUse).toBe(0)
      }),
    )
  })

  it("make_array_from_callback asks once per distinct slice", async () => {
    await withDevices(8, (d) =>
      Effect.gen(function* () {
        const mesh = meshOf(8, [2, 4])
        const asked: Slice[] = []
        const arr = yield* makeArrayFromCallback(
          d.engine,
          [4, 4],
          "float32",
          new NamedSharding(mesh, P("data")),
          (s) => {
            asked.push(s)
            return new Float32Array(s.shape[0]! * s.shape[1]!).fill(s.offsets[0]!)
          },
        )
        expect(asked.map((s) => s.offsets)).toEqual([
          [0, 0],
          [2, 0],
        ])
        expect(Array.from(toHost(arr) as Float32Array)).toEqual([
          ...new Array(8).fill(0),
          ...new Array(8).fill(2),
        ])
      }),
    )
  })

  it("wrong host data is a typed error and frees what it allocated", async () => {
    await withDevices(2, (d) =>
      Effect.gen(function* () {
        const mesh = meshOf(2, [2, 1])
        const err = yield* Effect.flip(
          makeArrayFromCallback(
            d.engine,
            [4],
            "float32",
            new NamedSharding(mesh, P("data")),
            () => new Float32Array(3),
          ),
        )
        expect(err._tag).toBe("HostDataMismatch")
        expect((yield* d.memory(0)).inUse).toBe(0)
        const short = yield* Effect.flip(
          fromHost(d.engine, new Float32Array(3), [4], "float32", new NamedSharding(mesh, P())),
        )
        expect(short._tag).toBe("HostDataMismatch")
        const indiv = yield* Effect.flip(
          fromHost(d.engine, new Float32Array(3), [3], "float32", new NamedSharding(mesh, P("data")), "w"),
        )
        expect(indiv._tag).toBe("IndivisibleDimension")
      }),
    )
  })

  it("round-trips and reshards any sharding to any other (property)", async () => {
    const dtypes: DType[] = ["float32", "bfloat16", "int32", "int64", "uint8"]
    await withDevices(8, (d) =>
      Effect.gen(function* () {
        const meshes: Mesh[] = [
          meshOf(8, [2, 4]),
          meshOf(8, [8, 1]),
          meshOf(8, [1, 8]),
          meshOf(8, [2, 2, 2], ["a", "b", "c"]),
        ]
        const specFor = (mesh: Mesh, pick: number[], rank: number) => {
          const entries: string[][] = Array.from({ length: rank }, () => [])
          mesh.axisNames.forEach((a, i) => {
            const dim = pick[i]! % (rank + 1)
            if (dim < rank) entries[dim]!.push(a)
          })
          return new PartitionSpec(entries)
        }
        fc.assert(
          fc.property(
            fc.integer({ min: 0, max: meshes.length - 1 }),
            fc.integer({ min: 1, max: 3 }),
            fc.array(fc.integer({ min: 0, max: 3 }), { minLength: 3, maxLength: 3 }),
            fc.array(fc.integer({ min: 0, max: 3 }), { minLength: 3, maxLength: 3 }),
            fc.array(fc.integer({ min: 1, max: 2 }), { minLength: 3, maxLength: 3 }),
            fc.constantFrom(...dtypes),
            (mi, rank, pickA, pickB, mult, dtype) => {
              const mesh = meshes[mi]!
              const a = specFor(mesh, pickA, rank)
              const b = specFor(mesh, pickB, rank)
              const shape = Array.from({ length: rank }, (_, i) => 8 * mult[i]!)
              const n = shape.reduce((x, y) => x * y, 1)
              const host =
                dtype === "int64"
                  ? BigInt64Array.from({ length: n }, (_, i) => BigInt(i * 7 - 3))
                  : dtype === "bfloat16"
                    ? Uint16Array.from({ length: n }, (_, i) => (i * 31) & 0xffff)
                    : dtype === "int32"
                      ? Int32Array.from({ length: n }, (_, i) => i * 13 - 100)
                      : dtype === "uint8"
                        ? Uint8Array.from({ length: n }, (_, i) => i & 255)
                        : iota(n)
              const x = Effect.runSync(fromHost(d.engine, host, shape, dtype, new NamedSharding(mesh, a)))
              const y = Effect.runSync(reshard(x, new NamedSharding(mesh, b)))
              expect(toHost(y)).toEqual(host)
              x.dispose()
              y.dispose()
            },
          ),
          { numRuns: 150 },
        )
        for (let dev = 0; dev < 8; dev++) expect((yield* d.memory(dev)).inUse).toBe(0)
      }),
    )
  })

  it("itemSharding maps a tree of arrays to their shardings", async () => {
    await withDevices(2, (d) =>
      Effect.gen(function* () {
        const mesh = meshOf(2, [2, 1])
        const s = new NamedSharding(mesh, P("data"))
        const a = yield* fromHost(d.engine, iota(2), [2], "float32", s)
        const tree = itemSharding({ w: a, inner: [a] }) as { w: NamedSharding; inner: NamedSharding[] }
        expect(tree.w).toBe(s)
        expect(tree.inner[0]).toBe(s)
      }),
    )
  })
})

describe("engine.tidy", () => {
  it("disposes temporaries and keeps what the result reaches, also on failure", async () => {
    await withDevices(1, (d) =>
      Effect.gen(function* () {
        const mesh = meshOf(1, [1, 1])
        const s = new NamedSharding(mesh, P())
        const kept = d.engine.tidy(() => {
          Effect.runSync(fromHost(d.engine, iota(4), [4], "float32", s))
          const keep = Effect.runSync(fromHost(d.engine, iota(2), [2], "float32", s))
          return { keep }
        })
        expect((yield* d.memory(0)).inUse).toBe(8)
        expect(() =>
          d.engine.tidy(() => {
            Effect.runSync(fromHost(d.engine, iota(4), [4], "float32", s))
            throw new Error("step failed")
          }),
        ).toThrow("step failed")
        expect((yield* d.memory(0)).inUse).toBe(8)
        kept.keep.dispose()
        expect((yield* d.memory(0)).inUse).toBe(0)
      }),
    )
  })
})
