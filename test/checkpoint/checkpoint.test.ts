/**
 * Checkpoints: Zarr v3 that an independent reader (zarrita) opens; bit-exact restore from any
 * mesh and spec to any other, each device reading only the chunks that overlap its slice;
 * selective restore; corruption, mismatches and unsafe paths as typed errors; orbax's retention,
 * interval and latest step; background saving; a full disk; leftover temporary folders.
 */
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { crc32c } from "@node-rs/crc32"
import { FileSystemStore } from "@zarrita/storage"
import { Effect, Fiber, Layer, Option, type Scope } from "effect"
import { afterAll, describe, expect, it } from "vitest"
import * as zarr from "zarrita"
import { type DType, toBFloat16 } from "../../src/core/dtype.ts"
import type { Mesh } from "../../src/core/mesh.ts"
import { LlamaForCausalLM } from "../../src/core/models/decoder.ts"
import { type PartitionRules, rulesWithout, specFor } from "../../src/core/partitionRules.ts"
import { fromHost, type ShardedArray, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P, type PartitionSpec, type Slice } from "../../src/core/sharding.ts"
import type { Tree } from "../../src/core/tree.ts"
import {
  type ArrayTarget,
  Checkpointer,
  type CheckpointerOptions,
  type CheckpointIO,
  nodeIO,
} from "../../src/layers/Checkpointer.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { fixtures, mesh } from "../helpers.ts"

const made: string[] = []
const tmp = () => {
  const dir = mkdtempSync(join(tmpdir(), "magix-ckpt-"))
  made.push(dir)
  return dir
}
afterAll(() => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true })
})

/** Runs with a Checkpointer on `directory` over 4 CPU devices (smaller meshes use the first ones). */
const withCheckpointer = <A, E>(
  directory: string,
  effect: Effect.Effect<A, E, Devices | Checkpointer | Hub | Scope.Scope>,
  options: Partial<CheckpointerOptions> = {},
) =>
  Effect.runPromise(
    effect.pipe(
      Effect.provide(Checkpointer.layer({ directory, ...options })),
      Effect.scoped,
      Effect.provide(Layer.mergeAll(CpuRuntime({ devices: 4 }), Hub.localDirectory(join(fixtures, "hf")))),
    ),
  )

/** The typed failure of an effect (fails the test if it succeeds). */
const failureOf = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.flatMap(Effect.result(effect), (r) =>
    r._tag === "Failure" ? Effect.succeed(r.failure) : Effect.die(new Error("expected a failure")),
  )

const bits = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)

const place = (data: ArrayBufferView, shape: number[], dtype: DType, m: Mesh, spec: PartitionSpec) =>
  Effect.flatMap(Devices, ({ engine }) => fromHost(engine, data, shape, dtype, new NamedSharding(m, spec)))

const target = (shape: number[], dtype: DType, m: Mesh, spec: PartitionSpec): ArrayTarget => ({
  shape,
  dtype,
  sharding: new NamedSharding(m, spec),
})

const distinct = (n: number) => Float32Array.from({ length: n }, (_, i) => i * 1.25 - 17)

describe("the format", () => {
  it("is a Zarr v3 group that zarrita reads back to the same arrays (float32, int32, a scalar), with a manifest", async () => {
    const dir = tmp()
    const saved = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const m = mesh([2, 2])
        const { params } = yield* loadModelHub(LlamaForCausalLM, "llama", LlamaForCausalLM.partitionRules, m)
        const ints = yield* place(
          Int32Array.from({ length: 24 }, (_, i) => i * 3 - 7),
          [4, 6],
          "int32",
          m,
          P("data"),
        )
        const scalar = yield* place(Float32Array.of(2.5), [], "float32", m, P())
        yield* ckpt.save(
          7,
          { params, extra: { ints, count: scalar } },
          {
            rules: LlamaForCausalLM.partitionRules,
            dataPosition: { steps: 7 },
            rng: { seed: 3 },
            modelConfig: { hidden_size: 64 },
          },
        )
        yield* ckpt.wait
        return {
          params: Object.fromEntries(Object.entries(params).map(([k, v]) => [k, toHost(v)])),
          localShapes: Object.fromEntries(Object.entries(params).map(([k, v]) => [k, v.localShape])),
          ints: toHost(ints),
          manifest: yield* ckpt.readManifest(7),
        }
      }),
    )
    const store = new FileSystemStore(join(dir, "7"))
    const group = await zarr.open(zarr.root(store), { kind: "group" })
    expect(group.attrs).toEqual({ step: 7 })
    await zarr.open(zarr.root(store).resolve("params"), { kind: "group" })
    for (const [name, data] of Object.entries(saved.params)) {
      const arr = await zarr.open(zarr.root(store).resolve(`params/${name}`), { kind: "array" })
      // Chunked by the saving sharding: one chunk per distinct device block.
      expect(arr.chunks, name).toEqual(saved.localShapes[name])
      const got = await zarr.get(arr)
      expect(bits(got.data as Float32Array).equals(bits(data)), name).toBe(true)
    }
    const ints = await zarr.get(await zarr.open(zarr.root(store).resolve("extra/ints"), { kind: "array" }))
    expect(Array.from(ints.data as Int32Array)).toEqual(Array.from(saved.ints as Int32Array))
    const scalar = await zarr.get(await zarr.open(zarr.root(store).resolve("extra/count"), { kind: "array" }))
    expect(scalar).toBe(2.5)
    expect(readdirSync(join(dir, "7", "params", "model.embed_tokens.weight", "c")).sort()).toEqual(["0", "1"])

    const m = saved.manifest
    expect(m.step).toBe(7)
    expect(m.library).toMatch(/^magix-ts \d/)
    expect(m.mesh).toEqual({ shape: [2, 2], axisNames: ["data", "model"] })
    expect(m.dataPosition).toEqual({ steps: 7 })
    expect(m.rng).toEqual({ seed: 3 })
    expect(m.modelConfig).toEqual({ hidden_size: 64 })
    expect(m.items).toEqual(["params", "extra"])
    expect(m.rules.length).toBe(LlamaForCausalLM.partitionRules.length)
    expect(m.rules[0]).toEqual(["embed_tokens", ["data", "model"]])
    expect(m.arrays.find((a) => a.path === "params/model.embed_tokens.weight")).toMatchObject({
      dtype: "float32",
      spec: ["data", "model"],
    })
    expect(m.arrays.find((a) => a.path === "extra/count")).toMatchObject({ shape: [], spec: [] })
    // The manifest on disk is the one readManifest returns.
    expect(JSON.parse(readFileSync(join(dir, "7", "manifest.json"), "utf8"))).toEqual(
      JSON.parse(JSON.stringify(m)),
    )
  })

  it("stores bfloat16 as the Zarr 'bfloat16' type: raw little-endian chunks, each with its crc32c", async () => {
    const dir = tmp()
    const values = Uint16Array.from({ length: 8 * 12 }, (_, i) => toBFloat16(i * 0.5 - 3))
    await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const w = yield* place(values, [8, 12], "bfloat16", mesh([2, 2]), P("model", "data"))
        yield* ckpt.save(1, { params: { w } })
      }),
    )
    const arrayDir = join(dir, "1", "params", "w")
    const meta = JSON.parse(readFileSync(join(arrayDir, "zarr.json"), "utf8"))
    expect(meta.data_type).toBe("bfloat16")
    expect(meta.chunk_grid.configuration.chunk_shape).toEqual([4, 6])
    // Reassemble the array from the chunk files alone, as any Zarr reader would.
    const whole = new Uint16Array(8 * 12)
    for (const i of [0, 1])
      for (const j of [0, 1]) {
        const file = readFileSync(join(arrayDir, "c", String(i), String(j)))
        expect(file.byteLength).toBe(4 * 6 * 2 + 4)
        const body = file.subarray(0, 48)
        expect(file.readUInt32LE(48)).toBe(crc32c(body))
        for (let r = 0; r < 4; r++)
          for (let c = 0; c < 6; c++) whole[(i * 4 + r) * 12 + j * 6 + c] = body.readUInt16LE((r * 6 + c) * 2)
      }
    expect(Array.from(whole)).toEqual(Array.from(values))
  })
})

describe("restore onto any mesh and spec", () => {
  const meshes: Array<[number, number]> = [
    [1, 1],
    [2, 2],
    [4, 1],
    [1, 4],
  ]
  const specs = [P("data", "model"), P("model", "data"), P(), P(null, "model"), P(["data", "model"])]
  const shape = [8, 12]

  /** Independently of chunksOverlapping: how many distinct saved blocks intersect `s`. */
  const blocksHit = (saved: NamedSharding, s: Slice) => {
    const seen = new Set<string>()
    for (const b of saved.slices(shape)) {
      const hit = b.offsets.every(
        (o, d) => o < s.offsets[d]! + s.shape[d]! && s.offsets[d]! < o + b.shape[d]!,
      )
      if (hit) seen.add(b.offsets.join(","))
    }
    return seen.size
  }

  it("every (mesh, spec) saved restores bit-exactly onto every (mesh, spec), each device reading only overlapping chunks", async () => {
    const dir = tmp()
    const data = distinct(8 * 12)
    const halves = Uint16Array.from({ length: 8 * 12 }, (_, i) => toBFloat16(i / 7 - 5))
    const saved: Array<{ step: number; sharding: NamedSharding }> = []
    await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        for (const from of meshes)
          for (const spec of specs) {
            const m = mesh(from)
            const step = saved.length
            const w = yield* place(data, shape, "float32", m, spec)
            const h = yield* place(halves, shape, "bfloat16", m, spec)
            yield* ckpt.save(step, { params: { w, h } })
            yield* ckpt.wait
            saved.push({ step, sharding: w.sharding })
            w.dispose()
            h.dispose()
          }
        let checked = 0
        for (const { step, sharding: from } of saved)
          for (const to of meshes)
            for (const spec of specs) {
              const m = mesh(to)
              const out = yield* ckpt.restore(step, {
                params: { w: target(shape, "float32", m, spec), h: target(shape, "bfloat16", m, spec) },
              })
              const where = `saved ${from}, restored onto ${m} ${spec}`
              expect(bits(toHost(out.params.w)).equals(bits(data)), where).toBe(true)
              expect(bits(toHost(out.params.h)).equals(bits(halves)), where).toBe(true)
              expect(out.params.w.sharding.spec.equals(spec)).toBe(true)
              const stats = yield* ckpt.stats
              const elements = from.shardShape(shape).reduce((a, b) => a * b, 1)
              const chunkBytes = elements * 4 + 4
              const halfBytes = elements * 2 + 4
              const savedChunks = from.mesh.size / from.replication
              for (let q = 0; q < m.size; q++) {
                const hit = blocksHit(from, new NamedSharding(m, spec).slice(q, shape))
                expect(stats.restoreChunksPerPosition[q], `${where}, position ${q}`).toBe(2 * hit)
                expect(stats.restoreBytesPerPosition[q], `${where}, position ${q}`).toBe(
                  hit * (chunkBytes + halfBytes),
                )
              }
              // A chunk needed by several devices is read once.
              expect(stats.restoreBytesRead).toBeLessThanOrEqual(savedChunks * (chunkBytes + halfBytes))
              out.params.w.dispose()
              out.params.h.dispose()
              checked++
            }
        expect(checked).toBe(400)
      }),
    )
  }, 120_000)

  it("reads exactly the chunks a device's new slice overlaps (worked cases)", async () => {
    const dir = tmp()
    const data = distinct(8 * 12)
    const perPosition = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        // Saved from 2×2 with P(data, model): four chunks of [4, 6].
        yield* ckpt.save(1, { w: yield* place(data, shape, "float32", mesh([2, 2]), P("data", "model")) })
        // Saved from 1×1: one chunk holding everything.
        yield* ckpt.save(2, { w: yield* place(data, shape, "float32", mesh([1, 1]), P()) })
        yield* ckpt.wait
        const counts = (step: number, t: ArrayTarget) =>
          Effect.gen(function* () {
            const out = yield* ckpt.restore(step, { w: t })
            expect(bits(toHost(out.w)).equals(bits(data))).toBe(true)
            out.w.dispose()
            const s = yield* ckpt.stats
            return [s.restoreChunksPerPosition, s.restoreBytesPerPosition, s.restoreBytesRead]
          })
        return {
          same: yield* counts(1, target(shape, "float32", mesh([2, 2]), P("data", "model"))),
          whole: yield* counts(1, target(shape, "float32", mesh([1, 1]), P())),
          columns: yield* counts(1, target(shape, "float32", mesh([1, 4]), P(null, "model"))),
          rows: yield* counts(1, target(shape, "float32", mesh([4, 1]), P("data"))),
          fromOne: yield* counts(2, target(shape, "float32", mesh([2, 2]), P("model", "data"))),
        }
      }),
    )
    const chunk = 4 * 6 * 4 + 4
    expect(perPosition.same).toEqual([[1, 1, 1, 1], new Array(4).fill(chunk), 4 * chunk])
    expect(perPosition.whole).toEqual([[4], [4 * chunk], 4 * chunk])
    // A [8, 3] column slice crosses both row halves of one column half: two chunks each.
    expect(perPosition.columns).toEqual([[2, 2, 2, 2], new Array(4).fill(2 * chunk), 4 * chunk])
    // A [2, 12] row slice crosses both column halves of one row half.
    expect(perPosition.rows).toEqual([[2, 2, 2, 2], new Array(4).fill(2 * chunk), 4 * chunk])
    const all = 8 * 12 * 4 + 4
    expect(perPosition.fromOne).toEqual([[1, 1, 1, 1], new Array(4).fill(all), all])
  })

  it("a model saved with its optimizer state restores its parameters alone onto another mesh and rule set", async () => {
    const dir = tmp()
    const rules: Array<[string, PartitionRules, [number, number]]> = [
      ["fsdp", rulesWithout(LlamaForCausalLM.partitionRules, "model"), [4, 1]],
      ["tensor", rulesWithout(LlamaForCausalLM.partitionRules, "data"), [1, 4]],
      ["default", LlamaForCausalLM.partitionRules, [1, 1]],
    ]
    await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const { params } = yield* loadModelHub(
          LlamaForCausalLM,
          "llama",
          LlamaForCausalLM.partitionRules,
          mesh([2, 2]),
        )
        yield* ckpt.save(3, { params, optState: { mu: params, nu: params } })
        yield* ckpt.wait
        const original = Object.fromEntries(Object.entries(params).map(([k, v]) => [k, toHost(v)]))
        for (const [name, r, shapeOfMesh] of rules) {
          const m = mesh(shapeOfMesh)
          const targets = Object.fromEntries(
            Object.entries(params).map(([k, v]) => [
              k,
              target([...v.shape], v.dtype, m, specFor(r, k, v.shape)),
            ]),
          )
          const out = yield* ckpt.restore(3, { params: targets })
          expect(Object.keys(out)).toEqual(["params"])
          for (const [k, v] of Object.entries(out.params)) {
            expect(bits(toHost(v)).equals(bits(original[k]!)), `${name} ${k}`).toBe(true)
            expect(v.spec.equals(specFor(r, k, v.shape))).toBe(true)
            v.dispose()
          }
        }
      }),
    )
  }, 60_000)
})

describe("typed errors", () => {
  const save = (dir: string) =>
    withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const w = yield* place(distinct(64), [8, 8], "float32", mesh([2, 1]), P("data"))
        yield* ckpt.save(1, { params: { w } })
      }),
    )
  const restoreW = (dir: string, t: ArrayTarget = target([8, 8], "float32", mesh([2, 1]), P()), leaf = "w") =>
    withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        return yield* failureOf(ckpt.restore(1, { params: { [leaf]: t } }))
      }),
    )

  it("a flipped byte in a chunk names the array and the chunk", async () => {
    const dir = tmp()
    await save(dir)
    const chunk = join(dir, "1", "params", "w", "c", "1", "0")
    const bytes = readFileSync(chunk)
    bytes[9]! ^= 0x10
    writeFileSync(chunk, bytes)
    const err = await restoreW(dir)
    expect(err._tag).toBe("CheckpointCorrupt")
    expect(err).toMatchObject({ array: "params/w", chunk: "c/1/0" })
    expect(err.message).toContain("chunk c/1/0 of params/w")
    expect(err.message).toContain("crc32c")
  })

  it("a truncated or missing chunk, or a broken zarr.json, is corruption too", async () => {
    const dir = tmp()
    await save(dir)
    const chunk = join(dir, "1", "params", "w", "c", "0", "0")
    writeFileSync(chunk, readFileSync(chunk).subarray(0, 100))
    expect((await restoreW(dir)).message).toMatch(/chunk c\/0\/0 of params\/w holds 100 bytes, 132 expected/)
    rmSync(chunk)
    expect((await restoreW(dir)).message).toMatch(/chunk c\/0\/0 of params\/w is missing/)
    writeFileSync(join(dir, "1", "params", "w", "zarr.json"), "{ not json")
    const err = await restoreW(dir)
    expect(err).toMatchObject({ _tag: "CheckpointCorrupt", array: "params/w", chunk: "zarr.json" })
  })

  it("a missing array, a wrong shape or dtype, and a missing step name what is wrong", async () => {
    const dir = tmp()
    await save(dir)
    const missing = await restoreW(dir, target([8, 8], "float32", mesh([1, 1]), P()), "v")
    expect(missing).toMatchObject({ _tag: "CheckpointMismatch", array: "params/v" })
    expect(missing.message).toContain("params/v is not in the checkpoint")
    const shape = await restoreW(dir, target([8, 4], "float32", mesh([1, 1]), P()))
    expect(shape).toMatchObject({ _tag: "CheckpointMismatch", array: "params/w" })
    expect(shape.message).toContain("float32 [8, 8] in the checkpoint but float32 [8, 4] is wanted")
    const dtype = await restoreW(dir, target([8, 8], "bfloat16", mesh([1, 1]), P()))
    expect(dtype.message).toContain("bfloat16 [8, 8] is wanted")
    const notFound = await withCheckpointer(
      dir,
      Effect.flatMap(Checkpointer, (c) => failureOf(c.restore(2, { params: {} }))),
    )
    expect(notFound._tag).toBe("CheckpointNotFound")
    expect(notFound.message).toContain("step 2")
  })

  it("tree paths that could leave the step directory are refused on save and on restore", async () => {
    const dir = tmp()
    const errs = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const w = yield* place(distinct(4), [4], "float32", mesh([1, 1]), P())
        const out = []
        const cases: Array<Record<string, Tree<ShardedArray>>> = [
          { "../evil": { w } },
          { "/abs": { w } },
          { params: { "a/b": w } },
          { params: { "..": w } },
          { params: { "zarr.json": w } },
          { "manifest.json": w },
          { params: { "a.b": w, a: { b: w } } },
        ]
        for (const items of cases) out.push(yield* failureOf(ckpt.save(1, items)))
        out.push(yield* failureOf(ckpt.restore(1, { "..": target([4], "float32", mesh([1, 1]), P()) })))
        return out
      }),
    )
    for (const e of errs.slice(0, 7)) expect(e._tag).toBe("UnsafeCheckpointPath")
    expect(errs[2]!.message).toContain('"params/a/b"')
    expect(errs[6]!.message).toContain("two leaves")
    // Nothing was written anywhere, and restore refuses before looking (there is no step 1).
    expect(readdirSync(dir)).toEqual([])
    expect(existsSync(join(dir, "..", "evil"))).toBe(false)
    expect(errs[7]!._tag).toBe("CheckpointNotFound")
  })

  it("symbolic links inside a checkpoint and unsafe manifest paths are refused", async () => {
    const dir = tmp()
    await save(dir)
    const outside = tmp()
    // An array folder replaced by a link to a copy elsewhere.
    renameSync(join(dir, "1", "params", "w"), join(outside, "w"))
    symlinkSync(join(outside, "w"), join(dir, "1", "params", "w"))
    expect((await restoreW(dir)).message).toContain("symbolic link")
    // A chunk file replaced by a link.
    rmSync(join(dir, "1", "params", "w"))
    mkdirSync(join(dir, "1", "params", "w", "c", "0"), { recursive: true })
    mkdirSync(join(dir, "1", "params", "w", "c", "1"), { recursive: true })
    for (const f of ["zarr.json", "c/1/0"])
      writeFileSync(join(dir, "1", "params", "w", f), readFileSync(join(outside, "w", f)))
    symlinkSync(join(outside, "w", "c", "0", "0"), join(dir, "1", "params", "w", "c", "0", "0"))
    const link = await restoreW(dir)
    expect(link).toMatchObject({ _tag: "CheckpointCorrupt", chunk: "c/0/0" })
    expect(link.message).toContain("not a regular file")
    // A manifest listing a path that climbs out.
    const manifestFile = join(dir, "1", "manifest.json")
    const manifest = JSON.parse(readFileSync(manifestFile, "utf8"))
    manifest.arrays[0].path = "params/../../w"
    writeFileSync(manifestFile, JSON.stringify(manifest))
    const bad = await withCheckpointer(
      dir,
      Effect.flatMap(Checkpointer, (c) => failureOf(c.readManifest(1))),
    )
    expect(bad.message).toContain('unsafe array path "params/../../w"')
  })
})

describe("lifecycle", () => {
  it("maxToKeep, latestStep, saveInterval and the final forced save behave like orbax's CheckpointManager", async () => {
    const dir = tmp()
    const r = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const w = yield* place(new Float32Array(4), [4], "float32", mesh([1, 1]), P())
        expect(Option.isNone(yield* ckpt.latestStep)).toBe(true)
        const saved: number[] = []
        for (let s = 1; s <= 10; s++)
          if (ckpt.shouldSave(s, s === 10)) {
            saved.push(s)
            yield* ckpt.save(s, { params: { w } })
          }
        yield* ckpt.wait
        return {
          saved,
          all: yield* ckpt.allSteps,
          latest: yield* ckpt.latestStep,
          // A step at or before the newest saved one is never saved again, even when forced.
          again: [
            ckpt.shouldSave(9, true),
            ckpt.shouldSave(10, true),
            ckpt.shouldSave(12),
            ckpt.shouldSave(11, true),
          ],
        }
      }),
      { saveInterval: 3, maxToKeep: 2 },
    )
    expect(r.saved).toEqual([3, 6, 9, 10])
    expect(r.all).toEqual([9, 10])
    expect(Option.getOrThrow(r.latest)).toBe(10)
    expect(r.again).toEqual([false, false, true, true])
    expect(readdirSync(dir).sort()).toEqual(["10", "9"])
    // A new Checkpointer on the directory resumes orbax's rule from the newest step on disk.
    const reopened = await withCheckpointer(
      dir,
      Effect.map(Checkpointer, (c) => [c.shouldSave(10), c.shouldSave(12)]),
      {
        saveInterval: 3,
      },
    )
    expect(reopened).toEqual([false, true])
  })

  it("leftover temporary folders are never steps and are removed on start; incomplete steps are ignored", async () => {
    const dir = tmp()
    await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const w = yield* place(distinct(16), [4, 4], "float32", mesh([2, 2]), P("data", "model"))
        yield* ckpt.save(1, { params: { w } })
        yield* ckpt.save(2, { params: { w } })
        yield* ckpt.wait
      }),
    )
    // A complete step renamed to a temporary name (a save killed just before its rename) …
    renameSync(join(dir, "2"), join(dir, "2.tmp-0123abcd"))
    // … a deletion killed halfway, a step folder without a manifest, one with a broken manifest.
    mkdirSync(join(dir, "3.tmp-del-77"), { recursive: true })
    mkdirSync(join(dir, "4", "params"), { recursive: true })
    mkdirSync(join(dir, "5"))
    writeFileSync(join(dir, "5", "manifest.json"), '{"format": "magix-checkpoint-1", "step": 5')
    writeFileSync(join(dir, "notes.tmp-1"), "not ours")
    const r = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const listing = readdirSync(dir).sort()
        const all = yield* ckpt.allSteps
        const latest = yield* ckpt.latestStep
        const missing = yield* failureOf(ckpt.readManifest(4))
        // Saving a step whose folder is incomplete replaces it.
        const w = yield* place(distinct(16), [4, 4], "float32", mesh([1, 1]), P())
        yield* ckpt.save(4, { params: { w } })
        yield* ckpt.wait
        return { listing, all, latest, missing, after: yield* ckpt.allSteps }
      }),
    )
    expect(r.listing).toEqual(["1", "4", "5", "notes.tmp-1"])
    expect(r.all).toEqual([1])
    expect(Option.getOrThrow(r.latest)).toBe(1)
    expect(r.missing._tag).toBe("CheckpointNotFound")
    expect(r.after).toEqual([1, 4])
    expect(readdirSync(join(dir, "4")).sort()).toEqual(["manifest.json", "params", "zarr.json"])
  })

  it("saving runs in the background: device work and timers go on while a large save is written", async () => {
    const dir = tmp()
    const r = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const { engine } = yield* Devices
        const m = mesh([2, 2])
        const big: Record<string, ShardedArray> = {}
        for (let i = 0; i < 8; i++)
          big[`layer.${i}`] = yield* place(
            new Float32Array(1 << 21).fill(i),
            [2048, 1024],
            "float32",
            m,
            P("data", "model"),
          )
        const t0 = performance.now()
        yield* ckpt.save(1, { params: big })
        const returnedAfter = performance.now() - t0
        const pending = yield* ckpt.pendingStep
        const visibleAtReturn = existsSync(join(dir, "1"))
        // Small device round trips and timers, counted until the checkpoint lands.
        const waiter = yield* Effect.forkChild(ckpt.wait)
        let deviceOps = 0
        let timerTicks = 0
        const timer = setInterval(() => timerTicks++, 1)
        while (!existsSync(join(dir, "1"))) {
          const small = yield* fromHost(
            engine,
            Float32Array.of(deviceOps),
            [1],
            "float32",
            new NamedSharding(m, P()),
          )
          expect((toHost(small) as Float32Array)[0]).toBe(deviceOps)
          small.dispose()
          deviceOps++
          yield* Effect.sleep("2 millis")
        }
        clearInterval(timer)
        yield* Fiber.join(waiter)
        // A second save waits for the first before its own snapshot.
        yield* ckpt.save(2, { params: big })
        const firstDoneBeforeSecond = existsSync(join(dir, "1", "manifest.json"))
        yield* ckpt.wait
        const stats = yield* ckpt.stats
        return {
          returnedAfter,
          pending,
          visibleAtReturn,
          deviceOps,
          timerTicks,
          stats,
          firstDoneBeforeSecond,
        }
      }),
      { maxConcurrentWrites: 2 },
    )
    expect(Option.getOrThrow(r.pending)).toBe(1)
    expect(r.visibleAtReturn).toBe(false)
    expect(r.deviceOps).toBeGreaterThan(3)
    expect(r.timerTicks).toBeGreaterThan(3)
    expect(r.firstDoneBeforeSecond).toBe(true)
    expect(r.stats.bytesWritten).toBeGreaterThan(64 << 20)
    expect(r.stats.chunksWritten).toBe(8 * 4)
  }, 60_000)

  it("saves started from several fibers at once queue up, and all land", async () => {
    const dir = tmp()
    const all = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const w = yield* place(distinct(1 << 16), [256, 256], "float32", mesh([2, 2]), P("data", "model"))
        yield* Effect.forEach([1, 2, 3, 4], (s) => ckpt.save(s, { params: { w } }), {
          concurrency: "unbounded",
        })
        yield* ckpt.wait
        return yield* ckpt.allSteps
      }),
    )
    expect(all).toEqual([1, 2, 3, 4])
    expect(readdirSync(dir).sort()).toEqual(["1", "2", "3", "4"])
  })

  it("a full disk is a typed error, leaves no partial folder, keeps the previous checkpoint, and is reported once", async () => {
    const dir = tmp()
    const data = distinct(64)
    let full = false
    let writes = 0
    const disk: CheckpointIO = {
      ...nodeIO,
      writeFile: async (path, bytes) => {
        if (full && ++writes > 3)
          throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" })
        return nodeIO.writeFile(path, bytes)
      },
    }
    const r = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const w = yield* place(data, [8, 8], "float32", mesh([2, 2]), P("data", "model"))
        yield* ckpt.save(1, { params: { w } })
        yield* ckpt.wait
        full = true
        yield* ckpt.save(2, { params: { w } })
        const failed = yield* failureOf(ckpt.wait)
        const listing = readdirSync(dir).sort()
        const latest = yield* ckpt.latestStep
        const restored = yield* ckpt.restore(1, {
          params: { w: target([8, 8], "float32", mesh([1, 4]), P(null, "model")) },
        })
        const back = toHost(restored.params.w)
        // The failure of step 3's background write is the failure of the save after it.
        yield* ckpt.save(3, { params: { w } })
        const next = yield* failureOf(ckpt.save(4, { params: { w } }))
        full = false
        yield* ckpt.save(4, { params: { w } })
        yield* ckpt.wait
        return { failed, listing, latest, back, next, all: yield* ckpt.allSteps }
      }),
      { io: disk },
    )
    expect(r.failed).toMatchObject({ _tag: "CheckpointWriteFailed", step: 2, code: "ENOSPC" })
    expect(r.failed.message).toContain("no space left")
    expect(r.failed.message).toContain("Earlier checkpoints are intact")
    expect(r.listing).toEqual(["1"])
    expect(Option.getOrThrow(r.latest)).toBe(1)
    expect(bits(r.back).equals(bits(data))).toBe(true)
    expect(r.next).toMatchObject({ _tag: "CheckpointWriteFailed", step: 3 })
    expect(r.all).toEqual([1, 4])
  })

  it("a failing rename or directory fsync is a typed error too, and the temporary folder is removed", async () => {
    for (const broken of ["rename", "fsyncDir"] as const) {
      const dir = tmp()
      const io: CheckpointIO = {
        ...nodeIO,
        [broken]: async () => {
          throw Object.assign(new Error("EIO: i/o error"), { code: "EIO" })
        },
      }
      const err = await withCheckpointer(
        dir,
        Effect.gen(function* () {
          const ckpt = yield* Checkpointer
          const w = yield* place(distinct(4), [4], "float32", mesh([1, 1]), P())
          yield* ckpt.save(1, { w })
          return yield* failureOf(ckpt.wait)
        }),
        { io },
      )
      expect(err).toMatchObject({ _tag: "CheckpointWriteFailed", code: "EIO" })
      expect(readdirSync(dir), broken).toEqual([])
    }
  })
})

describe("an array item and a host copy", () => {
  it("an item that is one array is stored as that array; int64, bool and empty arrays round trip", async () => {
    const dir = tmp()
    const r = await withCheckpointer(
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const m = mesh([2, 2])
        const counter = yield* place(BigInt64Array.of(1n, -2n, 3n, 1n << 40n), [4], "int64", m, P("model"))
        const flags = Uint8Array.of(1, 0, 1, 1, 0, 0, 1, 0)
        const mask = yield* place(flags, [2, 4], "bool", m, P("data"))
        const empty = yield* place(new Float32Array(0), [0, 4], "float32", m, P("data", "model"))
        yield* ckpt.save(5, { counter, mask, empty })
        yield* ckpt.wait
        const out = yield* ckpt.restore(5, {
          counter: target([4], "int64", mesh([1, 1]), P()),
          mask: target([2, 4], "bool", mesh([1, 4]), P(null, "model")),
          empty: target([0, 4], "float32", mesh([1, 4]), P(null, "model")),
        })
        return { counter: toHost(out.counter), mask: toHost(out.mask), flags, empty: out.empty.shape }
      }),
    )
    expect(Array.from(r.counter as BigInt64Array)).toEqual([1n, -2n, 3n, 1n << 40n])
    expect(Array.from(r.mask as Uint8Array)).toEqual(Array.from(r.flags))
    // An empty array has metadata and no chunk.
    expect(r.empty).toEqual([0, 4])
    expect(readdirSync(join(dir, "5", "empty"))).toEqual(["zarr.json"])
    const store = new FileSystemStore(join(dir, "5"))
    const counter = await zarr.get(await zarr.open(zarr.root(store).resolve("counter"), { kind: "array" }))
    expect(Array.from(counter.data as BigInt64Array)).toEqual([1n, -2n, 3n, 1n << 40n])
  })
})
