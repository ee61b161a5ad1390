/**
 * The pure parts of the checkpoint format: Zarr v3 metadata written and parsed back, what the
 * parser refuses, chunk keys, the overlap arithmetic between a saved chunk grid and a requested
 * block (a property: the boxes tile the block exactly), the manifest schema and the name rules
 * that keep untrusted paths inside a step.
 */
import { Effect, Schema } from "effect"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import {
  CheckpointManifest,
  checkpointNameProblem,
  isTemporaryName,
  stepOfDirectoryName,
} from "../../src/core/checkpointManifest.ts"
import { dtypes } from "../../src/core/dtype.ts"
import type { Slice } from "../../src/core/sharding.ts"
import {
  arrayMetadata,
  chunkGridShape,
  chunkKey,
  chunkOfBlock,
  chunksOverlapping,
  contiguousRange,
  encodeMetadata,
  InvalidZarrMetadata,
  parseArrayMetadata,
  parseChunkKey,
} from "../../src/core/zarr.ts"

const parse = (json: unknown) => Effect.runSync(Effect.result(parseArrayMetadata(json, "x/zarr.json")))

describe("Zarr v3 array metadata", () => {
  it("round trips for every dtype through its JSON text", () => {
    for (const dtype of dtypes) {
      const meta = arrayMetadata([8, 0, 6], dtype, [4, 0, 3], { spec: ["data", null, "model"] })
      const text = encodeMetadata(meta)
      const parsed = Effect.runSync(parseArrayMetadata(JSON.parse(text), "x/zarr.json"))
      expect(parsed).toEqual({
        shape: [8, 0, 6],
        dtype,
        // Zarr requires positive chunk sizes: a zero-length dimension gets chunks of 1.
        chunkShape: [4, 1, 3],
        checksum: true,
        fillValue: dtype === "bool" ? false : 0,
        attributes: { spec: ["data", null, "model"] },
      })
    }
  })

  it("writes what the Zarr v3 spec and tensorstore expect", () => {
    const meta = JSON.parse(encodeMetadata(arrayMetadata([4, 6], "bfloat16", [2, 3])))
    expect(meta).toMatchObject({
      zarr_format: 3,
      node_type: "array",
      data_type: "bfloat16",
      chunk_grid: { name: "regular", configuration: { chunk_shape: [2, 3] } },
      chunk_key_encoding: { name: "default", configuration: { separator: "/" } },
      codecs: [{ name: "bytes", configuration: { endian: "little" } }, { name: "crc32c" }],
      fill_value: 0,
    })
    // tensorstore 0.1 refused `"dimension_names": null` (the spec allows only an array, or no key).
    expect("dimension_names" in meta ? Array.isArray(meta.dimension_names) : true).toBe(true)
  })

  it("refuses what this reader cannot decode, saying why", () => {
    const good = arrayMetadata([4, 6], "float32", [2, 3])
    const cases: Array<[unknown, string]> = [
      [{ ...good, data_type: "complex64" }, "complex64"],
      [{ ...good, codecs: [{ name: "bytes", configuration: { endian: "big" } }] }, "little-endian"],
      [{ ...good, codecs: [{ name: "bytes" }, { name: "gzip" }] }, "gzip"],
      [{ ...good, codecs: [{ name: "transpose" }, { name: "bytes" }] }, "first must be bytes"],
      [{ ...good, chunk_key_encoding: { name: "default", configuration: { separator: "." } } }, "separator"],
      [
        { ...good, chunk_grid: { name: "regular", configuration: { chunk_shape: [2] } } },
        "one per dimension",
      ],
      [{ ...good, chunk_grid: { name: "regular", configuration: { chunk_shape: [0, 3] } } }, "positive"],
      [{ ...good, shape: [4.5, 6] }, "non-negative integers"],
      [{ ...good, node_type: "group" }, "node_type"],
      [{ ...good, zarr_format: 2 }, "zarr_format"],
      ["not an object", "x/zarr.json"],
    ]
    for (const [json, why] of cases) {
      const r = parse(json)
      expect(r._tag, why).toBe("Failure")
      if (r._tag === "Failure") {
        expect(r.failure).toBeInstanceOf(InvalidZarrMetadata)
        expect(r.failure.message).toContain(why)
        expect(r.failure.message).toContain("x/zarr.json")
      }
    }
  })

  it("reads metadata without a checksum codec and single-byte types without endianness", () => {
    const meta = { ...arrayMetadata([3], "uint8", [3]), codecs: [{ name: "bytes" }] }
    const parsed = Effect.runSync(parseArrayMetadata(meta, "u8"))
    expect(parsed.checksum).toBe(false)
  })
})

describe("chunk keys", () => {
  it("use the default encoding with '/'", () => {
    expect(chunkKey([0, 1])).toBe("c/0/1")
    expect(chunkKey([])).toBe("c")
    expect(parseChunkKey("c/3/10", 2)).toEqual([3, 10])
    expect(parseChunkKey("c", 0)).toEqual([])
    for (const bad of ["c/1", "c/01/2", "c/-1/2", "c/../2", "d/1/2", "c/1/2/3"])
      expect(parseChunkKey(bad, 2), bad).toBeUndefined()
  })
})

describe("chunk overlap arithmetic", () => {
  it("lists the chunks overlapping a block with the shared boxes", () => {
    const o = chunksOverlapping([8, 6], [4, 3], { offsets: [2, 0], shape: [4, 6] })
    expect(o.map((c) => c.key)).toEqual(["c/0/0", "c/0/1", "c/1/0", "c/1/1"])
    expect(o[0]!.box).toEqual({ offsets: [2, 0], shape: [2, 3] })
    expect(o[0]!.inChunk).toEqual([2, 0])
    expect(o[0]!.inBlock).toEqual([0, 0])
    expect(o[3]!.box).toEqual({ offsets: [4, 3], shape: [2, 3] })
    expect(o[3]!.inChunk).toEqual([0, 0])
    expect(o[3]!.inBlock).toEqual([2, 3])
  })

  it("a block that is a chunk overlaps only that chunk; a scalar has the one chunk 'c'", () => {
    expect(chunksOverlapping([8, 6], [4, 3], { offsets: [4, 3], shape: [4, 3] }).map((c) => c.key)).toEqual([
      "c/1/1",
    ])
    expect(chunksOverlapping([], [], { offsets: [], shape: [] }).map((c) => c.key)).toEqual(["c"])
    expect(chunksOverlapping([0, 4], [1, 4], { offsets: [0, 0], shape: [0, 4] })).toEqual([])
    expect(chunkOfBlock([8, 6], [4, 3], { offsets: [4, 3], shape: [4, 3] })).toEqual([1, 1])
    expect(chunkOfBlock([8, 6], [4, 3], { offsets: [2, 0], shape: [4, 3] })).toBeUndefined()
    // Edge chunks of a grid that does not divide the shape are stored whole but hold less.
    expect(chunkGridShape([10, 6], [4, 3])).toEqual([3, 2])
    const edge = chunksOverlapping([10, 6], [4, 3], { offsets: [8, 0], shape: [2, 6] })
    expect(edge.map((c) => [c.key, c.chunk.shape, c.box.shape])).toEqual([
      ["c/2/0", [4, 3], [2, 3]],
      ["c/2/1", [4, 3], [2, 3]],
    ])
  })

  it("finds the boxes that are one contiguous run (copied in one piece on restore)", () => {
    expect(contiguousRange([4, 6], { offsets: [1, 0], shape: [2, 6] })).toEqual({ start: 6, length: 12 })
    expect(contiguousRange([4, 6], { offsets: [2, 3], shape: [1, 3] })).toEqual({ start: 15, length: 3 })
    expect(contiguousRange([4, 6], { offsets: [0, 0], shape: [2, 3] })).toBeUndefined()
    expect(contiguousRange([2, 3, 4], { offsets: [1, 1, 0], shape: [1, 2, 4] })).toEqual({
      start: 16,
      length: 8,
    })
    expect(contiguousRange([2, 3, 4], { offsets: [0, 1, 0], shape: [2, 1, 4] })).toBeUndefined()
    expect(contiguousRange([], { offsets: [], shape: [] })).toEqual({ start: 0, length: 1 })
  })

  it("the boxes tile any block exactly, each inside its chunk, and only overlapping chunks are listed", () => {
    const dims = fc.array(fc.tuple(fc.integer({ min: 1, max: 12 }), fc.integer({ min: 1, max: 12 })), {
      minLength: 0,
      maxLength: 3,
    })
    const caseArb = dims.chain((ds) =>
      fc
        .tuple(
          ...ds.map(([size]) =>
            fc
              .integer({ min: 0, max: size - 1 })
              .chain((o) => fc.tuple(fc.constant(o), fc.integer({ min: 1, max: size - o }))),
          ),
        )
        .map((ranges) => ({ ds, ranges: ranges as Array<[number, number]> })),
    )
    fc.assert(
      fc.property(caseArb, ({ ds, ranges }) => {
        const shape = ds.map(([s]) => s)
        const chunk = ds.map(([, c]) => c)
        const block: Slice = { offsets: ranges.map(([o]) => o), shape: ranges.map(([, n]) => n) }
        const overlaps = chunksOverlapping(shape, chunk, block)
        // Every element of the block is covered exactly once.
        const cover = new Map<string, number>()
        for (const o of overlaps) {
          for (let d = 0; d < shape.length; d++) {
            expect(o.box.offsets[d]).toBeGreaterThanOrEqual(o.chunk.offsets[d]!)
            expect(o.box.offsets[d]! + o.box.shape[d]!).toBeLessThanOrEqual(o.chunk.offsets[d]! + chunk[d]!)
            expect(o.box.shape[d]).toBeGreaterThan(0)
            expect(o.inChunk[d]).toBe(o.box.offsets[d]! - o.coords[d]! * chunk[d]!)
            expect(o.inBlock[d]).toBe(o.box.offsets[d]! - block.offsets[d]!)
          }
          const visit = (d: number, idx: number[]) => {
            if (d === shape.length) {
              const k = idx.join(",")
              cover.set(k, (cover.get(k) ?? 0) + 1)
              return
            }
            for (let i = 0; i < o.box.shape[d]!; i++) visit(d + 1, [...idx, o.box.offsets[d]! + i])
          }
          visit(0, [])
        }
        const volume = block.shape.reduce((a, b) => a * b, 1)
        expect(cover.size).toBe(volume)
        for (const n of cover.values()) expect(n).toBe(1)
        // The count is the product of the chunks each dimension's range touches: nothing extra is read.
        const expected = block.offsets.reduce(
          (p, o, d) =>
            p * (Math.floor((o + block.shape[d]! - 1) / chunk[d]!) - Math.floor(o / chunk[d]!) + 1),
          1,
        )
        expect(overlaps.length).toBe(expected)
      }),
      { numRuns: 300 },
    )
  })
})

describe("the manifest and the names inside a step", () => {
  const manifest = {
    format: "magix-checkpoint-1",
    step: 12,
    library: "magix-ts 0.1.0",
    createdAt: "2026-01-01T00:00:00.000Z",
    mesh: { shape: [2, 2], axisNames: ["data", "model"] },
    rules: [["embed_tokens", ["data", "model"]]],
    items: ["params"],
    arrays: [
      {
        path: "params/w",
        shape: [4, 4],
        dtype: "bfloat16",
        spec: [["data", "model"], null],
        chunkShape: [1, 4],
      },
    ],
    dataPosition: { epoch: 1, offset: 7 },
    rng: { seed: 42, counter: [1, 2] },
    modelConfig: { hidden_size: 64 },
  }

  it("decodes, and its JSON round trips", () => {
    const decoded = Schema.decodeUnknownSync(CheckpointManifest)(manifest)
    expect(JSON.parse(JSON.stringify(decoded))).toEqual(manifest)
    expect(Schema.is(CheckpointManifest)({ ...manifest, format: "other" })).toBe(false)
    expect(
      Schema.is(CheckpointManifest)({ ...manifest, arrays: [{ ...manifest.arrays[0], dtype: "float8" }] }),
    ).toBe(false)
  })

  it("only single safe folder names pass; nothing can leave the step directory", () => {
    for (const ok of ["params", "model.layers.0.mlp.up_proj.weight", "opt_state", "mu-1", "c", "x.y_z"])
      expect(checkpointNameProblem(ok), ok).toBeUndefined()
    for (const bad of [
      "",
      ".",
      "..",
      "../x",
      "a/../../b",
      "/etc/passwd",
      "a/b",
      "a\\b",
      "a..b",
      ".hidden",
      "-x",
      "zarr.json",
      "manifest.json",
      "__private",
      "with space",
      "ü",
      "a".repeat(256),
    ])
      expect(checkpointNameProblem(bad), bad).toBeDefined()
  })

  it("step folders are decimal names; temporary folders are never steps", () => {
    expect(stepOfDirectoryName("0")).toBe(0)
    expect(stepOfDirectoryName("1200")).toBe(1200)
    for (const n of ["01", "12.tmp-abc", "12a", "-1", "1e3", " 12", "99999999999999999999"])
      expect(stepOfDirectoryName(n), n).toBeUndefined()
    expect(isTemporaryName("12.tmp-0a1b2c")).toBe(true)
    expect(isTemporaryName("12.tmp-del-0a1b2c")).toBe(true)
    expect(isTemporaryName("notes.tmp-1")).toBe(false)
    expect(isTemporaryName("12")).toBe(false)
  })
})
