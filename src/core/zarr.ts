/**
 * Zarr v3, the subset checkpoints use (the format tensorstore and orbax write): array metadata
 * with a regular chunk grid, the default chunk key encoding ("c/0/1"), little-endian `bytes` and
 * a `crc32c` checksum on every chunk; group metadata. Plus the arithmetic between a chunk grid and
 * a requested block: which chunks overlap it and which box of each to copy.
 */
import { Effect, Schema } from "effect"
import type { DType } from "./dtype.ts"
import type { Slice } from "./sharding.ts"

/** Zarr v3 data type names (bfloat16 is the registered extension name). */
const zarrNames: Record<DType, string> = {
  float32: "float32",
  float64: "float64",
  bfloat16: "bfloat16",
  float16: "float16",
  int32: "int32",
  int64: "int64",
  uint8: "uint8",
  bool: "bool",
  int8: "int8",
  int16: "int16",
}
const fromZarr = new Map(Object.entries(zarrNames).map(([k, v]) => [v, k as DType]))

export const toZarrDType = (t: DType): string => zarrNames[t]
export const fromZarrDType = (name: string): DType | undefined => fromZarr.get(name)

const Codec = Schema.Struct({
  name: Schema.String,
  configuration: Schema.optional(Schema.Record(Schema.String, Schema.Unknown)),
})

export const ArrayMetadata = Schema.Struct({
  zarr_format: Schema.Literal(3),
  node_type: Schema.Literal("array"),
  shape: Schema.Array(Schema.Number),
  data_type: Schema.String,
  chunk_grid: Schema.Struct({
    name: Schema.Literal("regular"),
    configuration: Schema.Struct({ chunk_shape: Schema.Array(Schema.Number) }),
  }),
  chunk_key_encoding: Schema.Struct({
    name: Schema.Literal("default"),
    configuration: Schema.optional(Schema.Struct({ separator: Schema.optional(Schema.String) })),
  }),
  fill_value: Schema.Unknown,
  codecs: Schema.Array(Codec),
  attributes: Schema.optional(Schema.Record(Schema.String, Schema.Unknown)),
  dimension_names: Schema.optional(Schema.NullOr(Schema.Array(Schema.NullOr(Schema.String)))),
})
export type ArrayMetadata = typeof ArrayMetadata.Type

export class InvalidZarrMetadata extends Schema.TaggedError<InvalidZarrMetadata>()("InvalidZarrMetadata", {
  path: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `${this.path} is not Zarr v3 array metadata this reader handles: ${this.detail}`
  }
}

/** What a checkpointed array's metadata says, validated. */
export interface ZarrArray {
  readonly shape: ReadonlyArray<number>
  readonly dtype: DType
  readonly chunkShape: ReadonlyArray<number>
  readonly checksum: boolean
  readonly attributes: Readonly<Record<string, unknown>>
}

export const arrayMetadata = (
  shape: ReadonlyArray<number>,
  dtype: DType,
  chunkShape: ReadonlyArray<number>,
  attributes: Readonly<Record<string, unknown>> = {},
): ArrayMetadata => ({
  zarr_format: 3,
  node_type: "array",
  shape: [...shape],
  data_type: toZarrDType(dtype),
  chunk_grid: { name: "regular", configuration: { chunk_shape: [...chunkShape] } },
  chunk_key_encoding: { name: "default", configuration: { separator: "/" } },
  fill_value: dtype === "bool" ? false : 0,
  codecs: [{ name: "bytes", configuration: { endian: "little" } }, { name: "crc32c" }],
  attributes: { ...attributes },
  dimension_names: null,
})

export const groupMetadata = (attributes: Readonly<Record<string, unknown>> = {}) => ({
  zarr_format: 3,
  node_type: "group",
  attributes: { ...attributes },
})

const positiveInts = (xs: ReadonlyArray<number>, allowZero: boolean) =>
  xs.every((x) => Number.isSafeInteger(x) && (allowZero ? x >= 0 : x > 0))

/** Parses and checks array metadata: only what this reader can decode passes. */
export const parseArrayMetadata = (
  json: unknown,
  path: string,
): Effect.Effect<ZarrArray, InvalidZarrMetadata> =>
  Effect.gen(function* () {
    const fail = (detail: string) => Effect.fail(new InvalidZarrMetadata({ path, detail }))
    const meta = yield* Schema.decodeUnknownEffect(ArrayMetadata)(json).pipe(
      Effect.mapError((e) => new InvalidZarrMetadata({ path, detail: String(e.message ?? e) })),
    )
    const dtype = fromZarrDType(meta.data_type)
    if (!dtype) return yield* fail(`unsupported data_type ${meta.data_type}`)
    const chunk = meta.chunk_grid.configuration.chunk_shape
    if (!positiveInts(meta.shape, true)) return yield* fail("shape must be non-negative integers")
    if (chunk.length !== meta.shape.length || !positiveInts(chunk, false))
      return yield* fail("chunk_shape must be positive integers, one per dimension")
    const sep = meta.chunk_key_encoding.configuration?.separator ?? "/"
    if (sep !== "/") return yield* fail(`chunk key separator "${sep}" (only "/" is read)`)
    const names = meta.codecs.map((c) => c.name)
    const endian = meta.codecs[0]?.configuration?.endian
    if (names[0] !== "bytes" || (endian !== undefined && endian !== "little"))
      return yield* fail("the first codec must be little-endian bytes")
    if (names.length > 2 || (names.length === 2 && names[1] !== "crc32c"))
      return yield* fail(`codecs ${names.join(", ")} (only bytes and crc32c are read)`)
    return {
      shape: meta.shape,
      dtype,
      chunkShape: chunk,
      checksum: names[1] === "crc32c",
      attributes: meta.attributes ?? {},
    }
  })

/** The key of a chunk under the default encoding: "c/0/1" ("c" for a scalar). */
export const chunkKey = (coords: ReadonlyArray<number>): string => ["c", ...coords.map(String)].join("/")

/** A chunk overlapping a block: its grid coordinates and the box shared with the block. */
export interface ChunkOverlap {
  readonly coords: ReadonlyArray<number>
  /** The chunk's offsets and its stored shape (always the full chunk shape, as Zarr stores edges). */
  readonly chunk: Slice
  /** The shared box, in global offsets. */
  readonly box: Slice
}

/** Every chunk of a regular grid that overlaps `block`, with the shared box. */
export const chunksOverlapping = (
  shape: ReadonlyArray<number>,
  chunkShape: ReadonlyArray<number>,
  block: Slice,
): ChunkOverlap[] => {
  const rank = shape.length
  const lo = block.offsets.map((o, d) => Math.floor(o / chunkShape[d]!))
  const hi = block.offsets.map((o, d) => Math.ceil((o + block.shape[d]!) / chunkShape[d]!))
  if (block.shape.some((s) => s === 0)) return []
  const out: ChunkOverlap[] = []
  const coords = [...lo]
  for (;;) {
    const chunkOffsets = coords.map((c, d) => c * chunkShape[d]!)
    const chunkDims = chunkOffsets.map((o, d) => Math.min(chunkShape[d]!, shape[d]! - o))
    const boxOffsets = chunkOffsets.map((o, d) => Math.max(o, block.offsets[d]!))
    const boxShape = boxOffsets.map(
      (o, d) => Math.min(chunkOffsets[d]! + chunkDims[d]!, block.offsets[d]! + block.shape[d]!) - o,
    )
    out.push({
      coords: [...coords],
      chunk: { offsets: chunkOffsets, shape: [...chunkShape] },
      box: { offsets: boxOffsets, shape: boxShape },
    })
    let d = rank - 1
    while (d >= 0) {
      coords[d]! += 1
      if (coords[d]! < hi[d]!) break
      coords[d] = lo[d]!
      d--
    }
    if (d < 0) break
  }
  return out
}
