import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { Effect } from "effect"
import fc from "fast-check"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { bytesOf, type DType, hostArray, itemSize, toBFloat16 } from "../../src/core/dtype.ts"
import { INDEX_FILE, makeIndex } from "../../src/core/safetensors.ts"
import { numel, strides } from "../../src/core/shape.ts"
import {
  openModelWeights,
  openSafetensors,
  type TensorData,
  writeSafetensors,
} from "../../src/layers/SafetensorsFile.ts"

let root: string
beforeAll(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), "magix-safetensors-"))
})
afterAll(async () => {
  await fs.rm(root, { recursive: true, force: true })
})

let counter = 0
const fresh = async (name = "d") => {
  const dir = path.join(root, `${name}-${counter++}`)
  await fs.mkdir(dir, { recursive: true })
  return dir
}
const run = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(e)
const flip = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(Effect.flip(e))

/** Deterministic, never-zero contents of a tensor. */
const filled = (dtype: DType, shape: number[], seed = 1): TensorData => {
  const n = numel(shape)
  const a = hostArray(dtype, n)
  for (let i = 0; i < n; i++) {
    const v = ((i + 1) * 2654435761 + seed * 97) % 1000
    if (a instanceof BigInt64Array) a[i] = BigInt(v) * 10_000_000_000n - 5n
    else if (dtype === "bfloat16") a[i] = toBFloat16(v / 7 - 50)
    else if (dtype === "float16") a[i] = (v * 61) & 0xffff
    else if (dtype === "bool") a[i] = v & 1
    else if (a instanceof Float32Array || a instanceof Float64Array) a[i] = v / 7 - 50.5
    else a[i] = (v % 120) - (dtype === "uint8" ? 0 : 60)
  }
  return { name: `t.${dtype}`, dtype, shape, data: a }
}

/** The block of a row-major array, element by element: the reference. */
const block = (
  data: ArrayBufferView,
  shape: number[],
  offsets: number[],
  sliceShape: number[],
  item: number,
) => {
  const src = bytesOf(data)
  const st = strides(shape)
  const out = new Uint8Array(numel(sliceShape) * item)
  for (let k = 0; k < numel(sliceShape); k++) {
    let rem = k
    let e = 0
    for (let d = shape.length - 1; d >= 0; d--) {
      e += ((rem % sliceShape[d]!) + offsets[d]!) * st[d]!
      rem = Math.floor(rem / sliceShape[d]!)
    }
    out.set(src.subarray(e * item, (e + 1) * item), k * item)
  }
  return out
}

describe("writeSafetensors and openSafetensors", () => {
  it("round-trips every dtype, scalars, empty tensors and metadata", async () => {
    const dir = await fresh()
    const file = path.join(dir, "model.safetensors")
    const tensors: TensorData[] = [
      filled("float32", [3, 5]),
      filled("bfloat16", [7]),
      filled("int64", [2, 2]),
      filled("float64", [4]),
      filled("float16", [2, 3]),
      filled("int32", [5]),
      filled("int16", [3]),
      filled("int8", [9]),
      filled("uint8", [1, 1, 4]),
      filled("bool", [6]),
      { ...filled("float32", []), name: "scalar" },
      { ...filled("float32", [0, 4]), name: "empty" },
    ]
    // NaN and infinity bit patterns travel untouched as bfloat16 bits.
    ;(tensors[1]!.data as Uint16Array).set([0x7fc1, 0xff80, 0x7f80], 0)
    await run(writeSafetensors(file, tensors, { format: "pt" }))
    expect(await fs.readdir(dir)).toEqual(["model.safetensors"])
    const raw = await fs.readFile(file)
    const n = Number(raw.readBigUInt64LE(0))
    expect((8 + n) % 8).toBe(0)
    expect(String.fromCharCode(raw[8]!)).toBe("{")

    await run(
      Effect.scoped(
        Effect.gen(function* () {
          const f = yield* openSafetensors(file)
          expect(f.header.metadata).toEqual({ format: "pt" })
          expect(new Set(f.names)).toEqual(new Set(tensors.map((t) => t.name)))
          expect(f.headerBytesRead).toBe(8 + n)
          expect(yield* f.bytesRead).toBe(0)
          for (const t of tensors) {
            const back = yield* f.readTensor(t.name)
            expect(back.constructor).toBe(t.data.constructor)
            expect(bytesOf(back)).toEqual(bytesOf(t.data))
            const e = yield* f.entry(t.name)
            expect(e.shape).toEqual(t.shape)
            expect(e.dtype).toBe(t.dtype)
          }
          const total = tensors.reduce((s, t) => s + t.data.byteLength, 0)
          expect(yield* f.bytesRead).toBe(total)
        }),
      ),
    )
  })

  it("reads a block of whole rows with one read of exactly its bytes", async () => {
    const file = path.join(await fresh(), "w.safetensors")
    const t = filled("float32", [8, 16])
    await run(writeSafetensors(file, [t]))
    await run(
      Effect.scoped(
        Effect.gen(function* () {
          const f = yield* openSafetensors(file)
          const rows = yield* f.readSlice(t.name, { offsets: [2, 0], shape: [3, 16] })
          expect(rows).toEqual((t.data as Float32Array).slice(32, 80))
          expect(yield* f.bytesRead).toBe(3 * 16 * 4)
          const cols = yield* f.readSlice(t.name, { offsets: [0, 4], shape: [8, 4] })
          expect(bytesOf(cols)).toEqual(block(t.data, [8, 16], [0, 4], [8, 4], 4))
          expect(yield* f.bytesRead).toBe(3 * 16 * 4 + 8 * 4 * 4)
        }),
      ),
    )
  })

  it("reads random blocks of random tensors exactly, reading only their bytes (property)", async () => {
    const dir = await fresh("prop")
    const arb = fc
      .record({
        shape: fc.array(fc.integer({ min: 1, max: 7 }), { minLength: 0, maxLength: 4 }),
        dtype: fc.constantFrom<DType>("float32", "bfloat16", "int64", "int8", "float64"),
        seed: fc.nat(1000),
      })
      .chain(({ shape, dtype, seed }) =>
        fc.tuple(...shape.map((d) => fc.tuple(fc.nat(d), fc.nat(d)))).map((pairs) => ({
          shape,
          dtype,
          seed,
          offsets: pairs.map(([a, b]) => Math.min(a, b)),
          sliceShape: pairs.map(([a, b]) => Math.abs(a - b)),
        })),
      )
    let i = 0
    await fc.assert(
      fc.asyncProperty(arb, async ({ shape, dtype, seed, offsets, sliceShape }) => {
        const file = path.join(dir, `p${i++}.safetensors`)
        const other = { ...filled("uint8", [3], seed), name: "other" }
        const t = filled(dtype, shape, seed)
        await run(writeSafetensors(file, [other, t]))
        await run(
          Effect.scoped(
            Effect.gen(function* () {
              const f = yield* openSafetensors(file)
              const out = yield* f.readSlice(t.name, { offsets, shape: sliceShape })
              expect(bytesOf(out)).toEqual(block(t.data, shape, offsets, sliceShape, itemSize(dtype)))
              expect(yield* f.bytesRead).toBe(numel(sliceShape) * itemSize(dtype))
            }),
          ),
        )
        await fs.rm(file)
      }),
      { numRuns: 60 },
    )
  })

  it("gives typed errors for missing tensors and blocks out of bounds", async () => {
    const file = path.join(await fresh(), "w.safetensors")
    await run(writeSafetensors(file, [filled("float32", [4, 4])]))
    await run(
      Effect.scoped(
        Effect.gen(function* () {
          const f = yield* openSafetensors(file)
          const missing = yield* Effect.flip(f.readTensor("lm_head.weight"))
          expect(missing._tag).toBe("TensorNotFound")
          expect(missing.message).toContain("lm_head.weight")
          expect(missing.message).toContain(file)
          const outside = yield* Effect.flip(f.readSlice("t.float32", { offsets: [2, 0], shape: [3, 4] }))
          expect(outside._tag).toBe("SafetensorsSliceOutOfBounds")
          expect(yield* f.bytesRead).toBe(0)
        }),
      ),
    )
  })

  it("closes the handle when the scope closes", async () => {
    const file = path.join(await fresh(), "w.safetensors")
    await run(writeSafetensors(file, [filled("float32", [4])]))
    const f = await run(Effect.scoped(openSafetensors(file)))
    const e = await flip(f.readTensor("t.float32"))
    expect(e._tag).toBe("SafetensorsIOError")
  })

  it("gives typed errors for missing, corrupt and truncated files", async () => {
    const dir = await fresh()
    const missing = await flip(Effect.scoped(openSafetensors(path.join(dir, "nope.safetensors"))))
    expect(missing._tag).toBe("SafetensorsFileNotFound")
    expect(missing.message).toContain("nope.safetensors")
    expect(missing.message).toContain("expected a .safetensors file")

    expect((await flip(Effect.scoped(openSafetensors(dir))))._tag).toBe("SafetensorsIOError")

    const good = path.join(dir, "good.safetensors")
    await run(writeSafetensors(good, [filled("float32", [16])]))
    const bytes = await fs.readFile(good)
    const write = async (name: string, b: Uint8Array) => {
      const p = path.join(dir, name)
      await fs.writeFile(p, b)
      return (await flip(Effect.scoped(openSafetensors(p))))._tag
    }
    expect(await write("tiny", bytes.subarray(0, 5))).toBe("SafetensorsBadHeaderLength")
    expect(await write("cut-header", bytes.subarray(0, 20))).toBe("SafetensorsBadHeaderLength")
    expect(await write("cut-data", bytes.subarray(0, bytes.byteLength - 4))).toBe("SafetensorsBadOffsets")
    const garbled = Uint8Array.from(bytes)
    garbled[9] = 0x5b
    expect(await write("garbled", garbled)).toBe("SafetensorsBadHeader")
    const huge = Uint8Array.from(bytes)
    new DataView(huge.buffer).setBigUint64(0, 2n ** 62n, true)
    expect(await write("huge", huge)).toBe("SafetensorsBadHeaderLength")
  })

  it("writes atomically: bad input leaves nothing, and a rewrite replaces the file whole", async () => {
    const dir = await fresh()
    const file = path.join(dir, "model.safetensors")
    const t = filled("float32", [4])
    const bad = await flip(writeSafetensors(file, [t, t]))
    expect(bad._tag).toBe("SafetensorsBadTensorInput")
    const short = await flip(writeSafetensors(file, [{ ...t, shape: [5] }]))
    expect(short._tag).toBe("SafetensorsBadTensorInput")
    expect(await fs.readdir(dir)).toEqual([])
    await run(writeSafetensors(file, [t]))
    await run(writeSafetensors(file, [{ ...filled("int64", [3]), name: "x" }]))
    expect(await fs.readdir(dir)).toEqual(["model.safetensors"])
    const names = await run(Effect.scoped(Effect.map(openSafetensors(file), (f) => f.names)))
    expect(names).toEqual(["x"])
    const noDir = await flip(writeSafetensors(path.join(dir, "missing", "m.safetensors"), [t]))
    expect(noDir._tag).toBe("SafetensorsFileNotFound")
  })
})

describe("openModelWeights", () => {
  const shard1 = [
    { ...filled("float32", [6, 4], 1), name: "model.embed_tokens.weight" },
    { ...filled("float32", [4], 2), name: "model.layers.0.input_layernorm.weight" },
  ]
  const shard2 = [
    { ...filled("bfloat16", [4, 4], 3), name: "model.layers.0.self_attn.q_proj.weight" },
    { ...filled("float32", [4], 4), name: "model.norm.weight" },
  ]
  const writeSharded = async (dir: string, weightMap?: Record<string, string>) => {
    await run(writeSafetensors(path.join(dir, "model-00001-of-00002.safetensors"), shard1))
    await run(writeSafetensors(path.join(dir, "model-00002-of-00002.safetensors"), shard2))
    const map =
      weightMap ??
      Object.fromEntries([
        ...shard1.map((t) => [t.name, "model-00001-of-00002.safetensors"]),
        ...shard2.map((t) => [t.name, "model-00002-of-00002.safetensors"]),
      ])
    await fs.writeFile(path.join(dir, INDEX_FILE), JSON.stringify(makeIndex(map, 0)))
  }

  it("reads a sharded checkpoint, opening shards only when needed", async () => {
    const dir = await fresh()
    await writeSharded(dir)
    await run(
      Effect.scoped(
        Effect.gen(function* () {
          const w = yield* openModelWeights(dir)
          expect(w.files).toEqual(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
          expect(new Set(w.names)).toEqual(new Set([...shard1, ...shard2].map((t) => t.name)))
          expect(w.fileOf("model.norm.weight")).toBe("model-00002-of-00002.safetensors")
          expect(yield* w.opened).toEqual([])
          const q = yield* w.readSlice("model.layers.0.self_attn.q_proj.weight", {
            offsets: [2, 0],
            shape: [2, 4],
          })
          expect(q).toEqual((shard2[0]!.data as Uint16Array).slice(8, 16))
          expect(yield* w.opened).toEqual(["model-00002-of-00002.safetensors"])
          expect(yield* w.bytesRead).toBe(16)
          const e = yield* w.readTensor("model.embed_tokens.weight")
          expect(e).toEqual(shard1[0]!.data)
          expect(new Set(yield* w.opened).size).toBe(2)
          expect(yield* w.bytesRead).toBe(16 + 96)
          expect((yield* w.entry("model.norm.weight")).shape).toEqual([4])
          const missing = yield* Effect.flip(w.readTensor("lm_head.weight"))
          expect(missing._tag).toBe("TensorNotFound")
          expect(missing.message).toContain(INDEX_FILE)
        }),
      ),
    )
  })

  it("reads a single-file checkpoint", async () => {
    const dir = await fresh()
    await run(writeSafetensors(path.join(dir, "model.safetensors"), shard1))
    const names = await run(
      Effect.scoped(
        Effect.gen(function* () {
          const w = yield* openModelWeights(dir)
          expect(w.files).toEqual(["model.safetensors"])
          expect(yield* w.readTensor("model.layers.0.input_layernorm.weight")).toEqual(shard1[1]!.data)
          return w.names
        }),
      ),
    )
    expect(new Set(names)).toEqual(new Set(shard1.map((t) => t.name)))
  })

  it("says what is missing: the directory, the weights, a shard, a tensor in a shard", async () => {
    const absent = await flip(Effect.scoped(openModelWeights(path.join(root, "no-such-model"))))
    expect(absent._tag).toBe("SafetensorsFileNotFound")
    expect(absent.message).toContain("no-such-model")

    const empty = await flip(Effect.scoped(openModelWeights(await fresh())))
    expect(empty._tag).toBe("ModelWeightsNotFound")
    expect(empty.message).toContain(INDEX_FILE)

    const dir = await fresh()
    await writeSharded(dir)
    await fs.rm(path.join(dir, "model-00002-of-00002.safetensors"))
    const shard = await flip(Effect.scoped(openModelWeights(dir)))
    expect(shard._tag).toBe("SafetensorsFileNotFound")
    expect(shard.message).toContain("model-00002-of-00002.safetensors")
    expect(shard.message).toContain("model.layers.0.self_attn.q_proj.weight")

    const wrong = await fresh()
    await writeSharded(wrong, { "model.norm.weight": "model-00001-of-00002.safetensors" })
    const e = await flip(
      Effect.scoped(Effect.flatMap(openModelWeights(wrong), (w) => w.readTensor("model.norm.weight"))),
    )
    expect(e._tag).toBe("TensorNotFound")
    expect(e.message).toContain("model-00001-of-00002.safetensors")

    const bad = await fresh()
    await fs.writeFile(path.join(bad, INDEX_FILE), "{ not json")
    expect((await flip(Effect.scoped(openModelWeights(bad))))._tag).toBe("InvalidWeightIndex")
  })

  it("refuses index entries that leave the directory, by name or through a symlink", async () => {
    const outside = path.join(await fresh("outside"), "secret.safetensors")
    await run(writeSafetensors(outside, shard2))
    const refuse = async (file: string, setup?: (dir: string) => Promise<void>) => {
      const dir = await fresh("model")
      await writeSharded(dir, {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": file,
      })
      await setup?.(dir)
      return flip(Effect.scoped(openModelWeights(dir)))
    }
    for (const name of [`../${path.basename(path.dirname(outside))}/secret.safetensors`, "/etc/passwd"]) {
      const e = await refuse(name)
      expect(e._tag).toBe("UnsafeIndexPath")
      expect(e.message).toContain("model.norm.weight")
    }
    const link = await refuse("link.safetensors", (dir) =>
      fs.symlink(outside, path.join(dir, "link.safetensors")),
    )
    expect(link._tag).toBe("UnsafeIndexPath")
    expect(link.message).toContain("symlink")
    const linkedDir = await refuse("sub/secret.safetensors", (dir) =>
      fs.symlink(path.dirname(outside), path.join(dir, "sub")),
    )
    expect(linkedDir._tag).toBe("UnsafeIndexPath")

    // A symlink that stays inside the directory is fine.
    const dir = await fresh("model")
    await writeSharded(dir, { "model.norm.weight": "alias.safetensors" })
    await fs.symlink("model-00002-of-00002.safetensors", path.join(dir, "alias.safetensors"))
    const norm = await run(
      Effect.scoped(Effect.flatMap(openModelWeights(dir), (w) => w.readTensor("model.norm.weight"))),
    )
    expect(norm).toEqual(shard2[1]!.data)
  })

  it("reads the Hugging Face cache layout, whose snapshot files link to the repo's blobs", async () => {
    const repo = path.join(await fresh("hub"), "models--org--tiny")
    const snapshot = path.join(repo, "snapshots", "abc123")
    await fs.mkdir(path.join(repo, "blobs"), { recursive: true })
    await fs.mkdir(snapshot, { recursive: true })
    await run(writeSafetensors(path.join(repo, "blobs", "f00d"), shard1))
    await fs.symlink("../../blobs/f00d", path.join(snapshot, "model.safetensors"))
    const e = await run(
      Effect.scoped(
        Effect.flatMap(openModelWeights(snapshot), (w) => w.readTensor("model.embed_tokens.weight")),
      ),
    )
    expect(e).toEqual(shard1[0]!.data)
  })
})
