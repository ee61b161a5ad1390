import { Cause, Effect, Exit } from "effect"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { itemSize } from "../../src/core/dtype.ts"
import {
  MAX_HEADER_BYTES,
  makeIndex,
  parseHeader,
  parseIndex,
  serializeHeader,
  sliceByteRuns,
  type TensorEntry,
  unsafePathReason,
} from "../../src/core/safetensors.ts"
import { numel, strides } from "../../src/core/shape.ts"

const run = <A, E>(e: Effect.Effect<A, E>) => Effect.runSync(e)
const fail = <A, E>(e: Effect.Effect<A, E>) => Effect.runSync(Effect.flip(e))

/** A file prefix: the 8-byte length and `text`; `dataSize` more bytes are said to follow. */
const headerBytes = (text: string | Uint8Array, lengthField?: bigint) => {
  const body = typeof text === "string" ? new TextEncoder().encode(text) : text
  const out = new Uint8Array(8 + body.byteLength)
  new DataView(out.buffer).setBigUint64(0, lengthField ?? BigInt(body.byteLength), true)
  out.set(body, 8)
  return out
}
const parse = (json: unknown, dataSize: number) => {
  const bytes = headerBytes(JSON.stringify(json))
  return parseHeader(bytes, bytes.byteLength + dataSize, "model.safetensors")
}

describe("parseHeader", () => {
  it("reads entries with absolute offsets and the metadata", () => {
    const h = run(
      parse(
        {
          __metadata__: { format: "pt" },
          a: { dtype: "F32", shape: [2, 3], data_offsets: [0, 24] },
          b: { dtype: "BF16", shape: [4], data_offsets: [24, 32] },
          c: { dtype: "I64", shape: [], data_offsets: [32, 40] },
          empty: { dtype: "F16", shape: [0, 5], data_offsets: [40, 40] },
        },
        40,
      ),
    )
    const start = h.dataStart
    expect(start).toBe(8 + h.headerLength)
    expect(h.metadata).toEqual({ format: "pt" })
    expect([...h.entries.keys()]).toEqual(["a", "b", "c", "empty"])
    expect(h.entries.get("a")).toEqual({
      name: "a",
      dtype: "float32",
      shape: [2, 3],
      begin: start,
      end: start + 24,
    })
    expect(h.entries.get("b")!.dtype).toBe("bfloat16")
    expect(h.entries.get("c")).toMatchObject({
      dtype: "int64",
      shape: [],
      begin: start + 32,
      end: start + 40,
    })
    expect(h.entries.get("empty")!.end - h.entries.get("empty")!.begin).toBe(0)
  })

  it("round-trips serializeHeader, 8-byte aligned and space-padded, widest dtypes first", () => {
    const tensors = [
      { name: "w.bf16", dtype: "bfloat16" as const, shape: [3], byteLength: 6 },
      { name: "w.f64", dtype: "float64" as const, shape: [2, 1], byteLength: 16 },
      { name: "w.u8", dtype: "uint8" as const, shape: [5], byteLength: 5 },
      { name: "w.f32", dtype: "float32" as const, shape: [1, 3], byteLength: 12 },
    ]
    const s = run(serializeHeader(tensors, { format: "pt", note: "x" }))
    expect(s.header.byteLength % 8).toBe(0)
    const n = Number(new DataView(s.header.buffer).getBigUint64(0, true))
    expect(n).toBe(s.header.byteLength - 8)
    const text = new TextDecoder().decode(s.header.subarray(8))
    expect(text.startsWith('{"__metadata__":{"format":"pt","note":"x"}')).toBe(true)
    expect(text.trimEnd().length).toBeGreaterThan(text.length - 8)
    expect(text.slice(text.trimEnd().length)).toMatch(/^ *$/)
    expect(s.offsets.map((o) => o.name)).toEqual(["w.f64", "w.f32", "w.bf16", "w.u8"])
    for (const o of s.offsets) {
      const t = tensors.find((x) => x.name === o.name)!
      expect(o.begin % itemSize(t.dtype)).toBe(0)
    }
    expect(s.fileSize).toBe(s.header.byteLength + 16 + 12 + 6 + 5)
    const h = run(parseHeader(s.header, s.fileSize, "x.safetensors"))
    expect(h.metadata).toEqual({ format: "pt", note: "x" })
    for (const o of s.offsets) expect(h.entries.get(o.name)).toMatchObject({ begin: o.begin, end: o.end })
    expect(h.entries.get("w.f64")!.shape).toEqual([2, 1])
  })

  it("keeps awkward tensor names (__proto__, integer-like) in data order", () => {
    const names = ["__proto__", "10", "2", "constructor"]
    const s = run(
      serializeHeader(names.map((name) => ({ name, dtype: "float32", shape: [1], byteLength: 4 }))),
    )
    const h = run(parseHeader(s.header, s.fileSize, "f"))
    expect(new Set(h.entries.keys())).toEqual(new Set(names))
    for (const [i, name] of names.entries()) {
      expect(s.offsets[i]!.name).toBe(name)
      expect(h.entries.get(name)).toMatchObject({ begin: s.offsets[i]!.begin, shape: [1] })
    }
  })

  it("refuses writer input that contradicts itself", () => {
    const t = { name: "a", dtype: "float32" as const, shape: [2], byteLength: 8 }
    expect(fail(serializeHeader([t, t]))._tag).toBe("SafetensorsBadTensorInput")
    const short = fail(serializeHeader([{ ...t, byteLength: 7 }]))
    expect(short.message).toContain('"a"')
    expect(short.message).toContain("needs 8 bytes")
    expect(fail(serializeHeader([{ ...t, name: "__metadata__" }]))._tag).toBe("SafetensorsBadTensorInput")
    expect(fail(serializeHeader([{ ...t, shape: [-2] }]))._tag).toBe("SafetensorsBadTensorInput")
  })

  describe("gives a typed error for every corruption", () => {
    const f32 = (offsets: unknown, shape: unknown = [2]) => ({ dtype: "F32", shape, data_offsets: offsets })
    const cases: Array<
      [string, Effect.Effect<unknown, { _tag: string; message: string }>, string, string[]]
    > = [
      [
        "a file shorter than 8 bytes",
        parseHeader(new Uint8Array(5), 5, "f"),
        "SafetensorsBadHeaderLength",
        ["f:"],
      ],
      [
        "a header length past the end of the file",
        parseHeader(headerBytes("{}", 1000n), 10, "f"),
        "SafetensorsBadHeaderLength",
        ["1000"],
      ],
      [
        "a header length over the 100 MB bound",
        parseHeader(headerBytes("{}", BigInt(MAX_HEADER_BYTES + 1)), 2 * MAX_HEADER_BYTES, "f"),
        "SafetensorsBadHeaderLength",
        ["limit"],
      ],
      [
        "a header length of 2^64 - 1",
        parseHeader(headerBytes("{}", 2n ** 64n - 1n), 100, "f"),
        "SafetensorsBadHeaderLength",
        [],
      ],
      ["bad JSON", parseHeader(headerBytes('{"a": '), 100, "f"), "SafetensorsBadHeader", ["JSON"]],
      [
        "bytes that are not UTF-8",
        parseHeader(headerBytes(new Uint8Array([0x7b, 0xff, 0xfe, 0x7d])), 100, "f"),
        "SafetensorsBadHeader",
        ["UTF-8"],
      ],
      ["a JSON array", parse([1, 2], 0), "SafetensorsBadHeader", ["not a JSON object"]],
      ["an entry that is not an object", parse({ w: 3 }, 0), "SafetensorsBadHeader", ['"w"']],
      [
        "a dtype that is not a string",
        parse({ w: { ...f32([0, 8]), dtype: 4 } }, 8),
        "SafetensorsBadHeader",
        ['"w"'],
      ],
      [
        "an unknown dtype",
        parse({ w: { dtype: "F8_E4M3", shape: [2], data_offsets: [0, 2] } }, 2),
        "SafetensorsUnsupportedDType",
        ['"w"', "F8_E4M3", "supported"],
      ],
      ["a negative dimension", parse({ w: f32([0, 8], [-2]) }, 8), "SafetensorsBadShape", ['"w"']],
      ["a fractional dimension", parse({ w: f32([0, 8], [1.5]) }, 8), "SafetensorsBadShape", []],
      ["a shape that is not a list", parse({ w: f32([0, 8], "2") }, 8), "SafetensorsBadShape", []],
      [
        "a shape whose size overflows",
        parse({ w: f32([0, 8], [2 ** 40, 2 ** 40]) }, 8),
        "SafetensorsBadShape",
        [],
      ],
      ["missing data_offsets", parse({ w: f32(undefined) }, 8), "SafetensorsBadOffsets", ['"w"']],
      ["three data_offsets", parse({ w: f32([0, 4, 8]) }, 8), "SafetensorsBadOffsets", []],
      ["negative data_offsets", parse({ w: f32([-8, 0]) }, 8), "SafetensorsBadOffsets", []],
      ["reversed data_offsets", parse({ w: f32([8, 0]) }, 8), "SafetensorsBadOffsets", ["before"]],
      [
        "data_offsets past the end of the file",
        parse({ w: f32([8, 16]) }, 8),
        "SafetensorsBadOffsets",
        ["past the end"],
      ],
      [
        "a size that disagrees with shape × dtype",
        parse({ w: f32([0, 12]) }, 12),
        "SafetensorsSizeMismatch",
        ['"w"', "needs 8 bytes", "span 12"],
      ],
      [
        "overlapping tensors",
        parse({ a: f32([0, 8]), b: f32([4, 12]) }, 12),
        "SafetensorsOverlap",
        ['"a"', '"b"'],
      ],
      [
        "metadata with a non-string value",
        parse({ __metadata__: { step: 3 }, a: f32([0, 8]) }, 8),
        "SafetensorsBadMetadata",
        ['"step"'],
      ],
      ["metadata that is a list", parse({ __metadata__: ["x"] }, 0), "SafetensorsBadMetadata", []],
    ]
    for (const [what, effect, tag, mentions] of cases)
      it(what, () => {
        const e = fail(effect)
        expect(e._tag).toBe(tag)
        expect(e.message).toContain("f")
        for (const m of mentions) expect(e.message).toContain(m)
      })

    it("names the file and a fix", () => {
      const e = fail(parse({ w: f32([8, 0]) }, 8))
      expect(e.message).toContain("model.safetensors")
      expect(e.message).toContain("write it again")
    })

    it("never crashes on random bytes or random mutations (property)", () => {
      const good = run(
        serializeHeader([
          { name: "a", dtype: "float32", shape: [2, 3], byteLength: 24 },
          { name: "b", dtype: "int64", shape: [1], byteLength: 8 },
        ]),
      ).header
      fc.assert(
        fc.property(
          fc.oneof(
            fc.uint8Array({ maxLength: 64 }),
            fc
              .array(fc.tuple(fc.nat(good.byteLength - 1), fc.integer({ min: 0, max: 255 })), {
                maxLength: 6,
              })
              .map((edits) => {
                const b = good.slice()
                for (const [i, v] of edits) b[i] = v
                return b
              }),
          ),
          fc.nat(200),
          (bytes, extra) => {
            const exit = Effect.runSyncExit(parseHeader(bytes, bytes.byteLength + extra, "f"))
            if (Exit.isFailure(exit)) expect(Cause.hasDies(exit.cause)).toBe(false)
          },
        ),
        { numRuns: 500 },
      )
    })
  })
})

/** The block `slice` of a row-major byte buffer, element by element: the reference. */
const naiveBlock = (
  data: Uint8Array,
  shape: number[],
  offsets: number[],
  sliceShape: number[],
  item: number,
) => {
  const st = strides(shape)
  const out = new Uint8Array(numel(sliceShape) * item)
  const idx = new Array<number>(shape.length).fill(0)
  for (let k = 0; k < numel(sliceShape); k++) {
    let rem = k
    for (let d = shape.length - 1; d >= 0; d--) {
      idx[d] = rem % sliceShape[d]!
      rem = Math.floor(rem / sliceShape[d]!)
    }
    const src = idx.reduce((acc, i, d) => acc + (i + offsets[d]!) * st[d]!, 0)
    out.set(data.subarray(src * item, (src + 1) * item), k * item)
  }
  return out
}

const entryOf = (shape: number[], item: number, begin = 100): TensorEntry => ({
  name: "t",
  dtype: item === 4 ? "float32" : item === 2 ? "bfloat16" : item === 8 ? "int64" : "uint8",
  shape,
  begin,
  end: begin + numel(shape) * item,
})

describe("sliceByteRuns", () => {
  it("reads a whole tensor, or whole rows, in one run", () => {
    const e = entryOf([4, 6], 4)
    expect(run(sliceByteRuns(e, { offsets: [0, 0], shape: [4, 6] }))).toEqual([
      { offset: 100, length: 96, destination: 0 },
    ])
    expect(run(sliceByteRuns(e, { offsets: [1, 0], shape: [2, 6] }))).toEqual([
      { offset: 124, length: 48, destination: 0 },
    ])
  })

  it("reads a column block as one run per row", () => {
    const e = entryOf([3, 8], 2)
    expect(run(sliceByteRuns(e, { offsets: [0, 4], shape: [3, 4] }))).toEqual([
      { offset: 108, length: 8, destination: 0 },
      { offset: 124, length: 8, destination: 8 },
      { offset: 140, length: 8, destination: 16 },
    ])
  })

  it("handles scalars, empty blocks and trailing dimensions of size one", () => {
    expect(run(sliceByteRuns(entryOf([], 8), { offsets: [], shape: [] }))).toEqual([
      { offset: 100, length: 8, destination: 0 },
    ])
    expect(run(sliceByteRuns(entryOf([4, 5], 4), { offsets: [1, 2], shape: [0, 3] }))).toEqual([])
    expect(run(sliceByteRuns(entryOf([2, 3, 1], 4), { offsets: [0, 1, 0], shape: [2, 2, 1] }))).toHaveLength(
      2,
    )
  })

  it("refuses blocks outside the tensor", () => {
    const e = entryOf([4, 6], 4)
    const outside = fail(sliceByteRuns(e, { offsets: [3, 0], shape: [2, 6] }))
    expect(outside._tag).toBe("SafetensorsSliceOutOfBounds")
    expect(outside.message).toContain('"t"')
    expect(fail(sliceByteRuns(e, { offsets: [0], shape: [4] }))._tag).toBe("SafetensorsSliceOutOfBounds")
    expect(fail(sliceByteRuns(e, { offsets: [-1, 0], shape: [1, 6] }))._tag).toBe(
      "SafetensorsSliceOutOfBounds",
    )
  })

  it("covers exactly the block, in order, with maximal runs (property)", () => {
    const arb = fc
      .record({
        shape: fc.array(fc.integer({ min: 1, max: 6 }), { minLength: 1, maxLength: 4 }),
        item: fc.constantFrom(1, 2, 4, 8),
      })
      .chain(({ shape, item }) =>
        fc.tuple(...shape.map((d) => fc.tuple(fc.nat(d - 1), fc.nat(d - 1)))).map((pairs) => ({
          shape,
          item,
          offsets: pairs.map(([a, b]) => Math.min(a, b)),
          sliceShape: pairs.map(([a, b]) => Math.abs(a - b) + 1),
        })),
      )
    fc.assert(
      fc.property(arb, ({ shape, item, offsets, sliceShape }) => {
        const begin = 40
        const data = new Uint8Array(begin + numel(shape) * item).map((_, i) => (i * 7 + 3) & 0xff)
        const e = entryOf(shape, item, begin)
        const runs = run(sliceByteRuns(e, { offsets, shape: sliceShape }, item))
        const out = new Uint8Array(numel(sliceShape) * item)
        let next = 0
        for (const r of runs) {
          expect(r.destination).toBe(next)
          expect(r.offset).toBeGreaterThanOrEqual(e.begin)
          expect(r.offset + r.length).toBeLessThanOrEqual(e.end)
          out.set(data.subarray(r.offset, r.offset + r.length), r.destination)
          next += r.length
        }
        expect(next).toBe(out.byteLength)
        for (let i = 1; i < runs.length; i++)
          expect(runs[i]!.offset).toBeGreaterThan(runs[i - 1]!.offset + runs[i - 1]!.length)
        expect(out).toEqual(naiveBlock(data.subarray(begin), shape, offsets, sliceShape, item))
      }),
      { numRuns: 300 },
    )
  })
})

describe("the sharded-checkpoint index", () => {
  const index = (weightMap: Record<string, string>) =>
    JSON.stringify({ metadata: { total_size: 10 }, weight_map: weightMap })

  it("parses the weight map and lists its files", () => {
    const i = run(
      parseIndex(
        index({
          "model.norm.weight": "model-00002-of-00002.safetensors",
          "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
          "lm_head.weight": "model-00002-of-00002.safetensors",
          "sub.weight": "sub/dir/x.safetensors",
        }),
        "model.safetensors.index.json",
      ),
    )
    expect(i.weightMap.get("model.norm.weight")).toBe("model-00002-of-00002.safetensors")
    expect(i.files).toEqual([
      "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors",
      "sub/dir/x.safetensors",
    ])
    expect(i.metadata).toEqual({ total_size: 10 })
    expect(
      run(parseIndex(JSON.stringify({ weight_map: { a: "a.safetensors" } }), "i")).metadata,
    ).toBeUndefined()
  })

  it("refuses file names that leave the model directory, naming the entry", () => {
    for (const bad of [
      "../x.safetensors",
      "/etc/passwd",
      "a/../../x.safetensors",
      "..",
      "a\\..\\x.safetensors",
      "x\0.safetensors",
      "C:/Windows/x.safetensors",
      "",
    ]) {
      const e = fail(
        parseIndex(index({ ok: "model.safetensors", "model.layers.0.mlp.up_proj.weight": bad }), "idx.json"),
      )
      expect(e._tag).toBe("UnsafeIndexPath")
      expect(e.message).toContain("model.layers.0.mlp.up_proj.weight")
      expect(e.message).toContain("idx.json")
      expect(unsafePathReason(bad)).toBeDefined()
    }
    expect(unsafePathReason("a/b..c.safetensors")).toBeUndefined()
    expect(unsafePathReason("./model.safetensors")).toBeUndefined()
  })

  it("gives InvalidWeightIndex for malformed indexes", () => {
    for (const text of [
      "{",
      "[]",
      JSON.stringify({ metadata: {} }),
      JSON.stringify({ weight_map: { a: 3 } }),
      JSON.stringify({ weight_map: {} }),
      JSON.stringify({ metadata: 3, weight_map: { a: "a" } }),
    ]) {
      const e = fail(parseIndex(text, "idx.json"))
      expect(e._tag).toBe("InvalidWeightIndex")
      expect(e.message).toContain("idx.json")
    }
  })

  it("writes an index that reads back", () => {
    const json = makeIndex(
      new Map([
        ["b", "2.safetensors"],
        ["a", "1.safetensors"],
      ]),
      1234,
    )
    expect(json).toEqual({
      metadata: { total_size: 1234 },
      weight_map: { a: "1.safetensors", b: "2.safetensors" },
    })
    expect(Object.keys(json.weight_map)).toEqual(["a", "b"])
    const back = run(parseIndex(JSON.stringify(json), "i"))
    expect([...back.weightMap]).toEqual([
      ["a", "1.safetensors"],
      ["b", "2.safetensors"],
    ])
    expect(makeIndex({ z: "f", y: "f" }, 0).weight_map).toEqual({ y: "f", z: "f" })
  })
})
