/**
 * Zarr v3, the subset checkpoints use (the format tensorstore and orbax write): array metadata
 * (`zarr.json`) with a regular chunk grid, the default chunk key encoding with "/" ("c/0/1"), the
 * little-endian `bytes` codec and a `crc32c` checksum on every chunk, a fill value; group
 * metadata. Plus the arithmetic between a saved chunk grid and a requested block: which chunks
 * overlap it and which box of each to copy where.
 *
 * Pure: no I/O and no checksum code here (the crc itself is computed by the Checkpointer layer).
 */
import { Effect, Schema } from "effect"
import type { DType } from "./dtype.ts"
import type { Slice } from "./sharding.ts"

/**
 * Zarr v3 data type names. All but bfloat16 are core data types; "bfloat16" is the name the
 * zarr-extensions registry gives it (what tensorstore writes), which some readers do not decode.
 */
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
/** The dtype of a Zarr data type name, or undefined for one this project does not hold. */
export const fromZarrDType = (name: string): DType | undefined => fromZarr.get(name)

/** The name of the metadata document of every Zarr v3 node. */
export const ZARR_JSON = "zarr.json"

const Codec = Schema.Struct({
  name: Schema.String,
  configuration: Schema.optional(Schema.Record(Schema.String, Schema.Unknown)),
})

/** A fill value as Zarr v3 spells it in JSON: a number, a boolean, or "NaN"/"Infinity"/"-Infinity"/"0x…". */
const FillValue = Schema.Union([Schema.Number, Schema.Boolean, Schema.String])

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
    configuration: Schema.optional(
      Schema.Struct({ separator: Schema.optional(Schema.Literals(["/", "."])) }),
    ),
  }),
  fill_value: FillValue,
  codecs: Schema.Array(Codec),
  attributes: Schema.optional(Schema.Record(Schema.String, Schema.Unknown)),
  dimension_names: Schema.optional(Schema.NullOr(Schema.Array(Schema.NullOr(Schema.String)))),
  storage_transformers: Schema.optional(Schema.Array(Schema.Unknown)),
})
export type ArrayMetadata = typeof ArrayMetadata.Type

export const GroupMetadata = Schema.Struct({
  zarr_format: Schema.Literal(3),
  node_type: Schema.Literal("group"),
  attributes: Schema.optional(Schema.Record(Schema.String, Schema.Unknown)),
})
export type GroupMetadata = typeof GroupMetadata.Type

export class InvalidZarrMetadata extends Schema.TaggedError<InvalidZarrMetadata>()("InvalidZarrMetadata", {
  path: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return (
      `${this.path} is not Zarr v3 array metadata this reader handles: ${this.detail}; ` +
      "checkpoints are written with a regular grid, default keys and the bytes (little-endian) + crc32c codecs"
    )
  }
}

/** What an array's metadata says, validated: everything a reader needs. */
export interface ZarrArray {
  readonly shape: ReadonlyArray<number>
  readonly dtype: DType
  readonly chunkShape: ReadonlyArray<number>
  /** Whether every chunk ends in a crc32c of the bytes before it. */
  readonly checksum: boolean
  /** The value of elements whose chunk is absent (as JSON: a number, a boolean or a special string). */
  readonly fillValue: number | boolean | string
  readonly attributes: Readonly<Record<string, unknown>>
}

/** The fill value written for each dtype: zero (false for bool). */
export const defaultFillValue = (t: DType): number | boolean => (t === "bool" ? false : 0)

/**
 * Array metadata for a checkpointed array: `chunkShape` is the block one device held when it was
 * saved. Zarr requires positive chunk sizes, so a zero-length dimension gets chunks of 1 (and no
 * chunk is ever stored for it).
 */
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
  chunk_grid: { name: "regular", configuration: { chunk_shape: chunkShape.map((c) => Math.max(1, c)) } },
  chunk_key_encoding: { name: "default", configuration: { separator: "/" } },
  fill_value: defaultFillValue(dtype),
  codecs: [{ name: "bytes", configuration: { endian: "little" } }, { name: "crc32c" }],
  attributes: { ...attributes },
  // dimension_names is left out: when present, Zarr v3 requires an array (tensorstore refuses null).
})

export const groupMetadata = (attributes: Readonly<Record<string, unknown>> = {}): GroupMetadata => ({
  zarr_format: 3,
  node_type: "group",
  attributes: { ...attributes },
})

/** A metadata document as its bytes on disk (indented, as zarr-python and tensorstore write it). */
export const encodeMetadata = (meta: ArrayMetadata | GroupMetadata): string =>
  `${JSON.stringify(meta, null, 2)}\n`

const nonNegativeInts = (xs: ReadonlyArray<number>) => xs.every((x) => Number.isSafeInteger(x) && x >= 0)
const positiveInts = (xs: ReadonlyArray<number>) => xs.every((x) => Number.isSafeInteger(x) && x > 0)

/**
 * Parses and checks array metadata (already JSON-parsed; `path` names the file in errors): only
 * what this reader can decode passes. Single-byte types need no endianness, as Zarr allows.
 */
export const parseArrayMetadata = (
  json: unknown,
  path: string,
): Effect.Effect<ZarrArray, InvalidZarrMetadata> =>
  Effect.gen(function* () {
    const fail = (detail: string) => Effect.fail(new InvalidZarrMetadata({ path, detail }))
    const meta = yield* Schema.decodeUnknownEffect(ArrayMetadata)(json).pipe(
      Effect.mapError((e) => new InvalidZarrMetadata({ path, detail: e.message })),
    )
    const dtype = fromZarrDType(meta.data_type)
    if (!dtype) return yield* fail(`unsupported data_type "${meta.data_type}"`)
    const chunk = meta.chunk_grid.configuration.chunk_shape
    if (!nonNegativeInts(meta.shape)) return yield* fail("shape must be non-negative integers")
    if (chunk.length !== meta.shape.length || !positiveInts(chunk))
      return yield* fail(
        `chunk_shape [${chunk}] must be positive integers, one per dimension of [${meta.shape}]`,
      )
    // A chunk reaching past the array holds only padding there; bounding it by the array keeps a
    // corrupt chunk_shape from sizing a read buffer of terabytes.
    const over = chunk.findIndex((c, d) => c > Math.max(1, meta.shape[d]!))
    if (over >= 0)
      return yield* fail(
        `chunk_shape [${chunk}] is larger than the array [${meta.shape}] along dimension ${over}`,
      )
    const sep = meta.chunk_key_encoding.configuration?.separator ?? "/"
    if (sep !== "/") return yield* fail(`chunk key separator "${sep}" (only "/" is read)`)
    if ((meta.storage_transformers ?? []).length > 0) return yield* fail("storage transformers are not read")
    const names = meta.codecs.map((c) => c.name)
    const endian = meta.codecs[0]?.configuration?.endian
    if (names[0] !== "bytes" || (endian !== undefined && endian !== "little"))
      return yield* fail(`codecs [${names.join(", ")}]: the first must be bytes, little-endian`)
    if (names.length > 2 || (names.length === 2 && names[1] !== "crc32c"))
      return yield* fail(`codecs [${names.join(", ")}] (only bytes, then optionally crc32c, are read)`)
    return {
      shape: meta.shape,
      dtype,
      chunkShape: chunk,
      checksum: names[1] === "crc32c",
      fillValue: meta.fill_value,
      attributes: meta.attributes ?? {},
    }
  })

/** The key of a chunk under the default encoding with "/": "c/0/1" ("c" for a 0-d array). */
export const chunkKey = (coords: ReadonlyArray<number>): string => ["c", ...coords.map(String)].join("/")

/** The grid coordinates of a default-encoded chunk key, or undefined where it is not one of `rank`. */
export const parseChunkKey = (key: string, rank: number): number[] | undefined => {
  const parts = key.split("/")
  if (parts[0] !== "c" || parts.length !== rank + 1) return undefined
  const coords = parts.slice(1).map((p) => (/^(0|[1-9]\d*)$/.test(p) ? Number(p) : Number.NaN))
  return coords.every(Number.isSafeInteger) ? coords : undefined
}

/** Chunks along each dimension of a regular grid (edge chunks count whole). */
export const chunkGridShape = (shape: ReadonlyArray<number>, chunkShape: ReadonlyArray<number>): number[] =>
  shape.map((d, i) => Math.ceil(d / chunkShape[i]!))

/** A chunk overlapping a block: its grid coordinates and what to copy from it into the block. */
export interface ChunkOverlap {
  readonly coords: ReadonlyArray<number>
  /** The chunk key ("c/0/1"). */
  readonly key: string
  /**
   * The chunk's global offsets and its stored shape: always the full chunk shape, because Zarr
   * stores edge chunks padded to it (so this is also the layout of the chunk's bytes).
   */
  readonly chunk: Slice
  /** The shared box, in global offsets. */
  readonly box: Slice
  /** Where the shared box starts inside the chunk. */
  readonly inChunk: ReadonlyArray<number>
  /** Where the shared box starts inside the block. */
  readonly inBlock: ReadonlyArray<number>
}

/**
 * Every chunk of a regular grid over `shape` that overlaps `block` (row-major order of their
 * coordinates), with the shared box: what a device whose slice is `block` must read, and nothing
 * more. The boxes tile the block exactly.
 */
export const chunksOverlapping = (
  shape: ReadonlyArray<number>,
  chunkShape: ReadonlyArray<number>,
  block: Slice,
): ChunkOverlap[] => {
  const rank = shape.length
  if (block.shape.some((s) => s === 0)) return []
  const lo = block.offsets.map((o, d) => Math.floor(o / chunkShape[d]!))
  const hi = block.offsets.map((o, d) => Math.ceil(Math.min(o + block.shape[d]!, shape[d]!) / chunkShape[d]!))
  if (lo.some((l, d) => l >= hi[d]!)) return []
  const out: ChunkOverlap[] = []
  const coords = [...lo]
  for (;;) {
    const chunkOffsets = coords.map((c, d) => c * chunkShape[d]!)
    const boxOffsets = chunkOffsets.map((o, d) => Math.max(o, block.offsets[d]!))
    const boxShape = boxOffsets.map(
      (o, d) =>
        Math.min(chunkOffsets[d]! + chunkShape[d]!, shape[d]!, block.offsets[d]! + block.shape[d]!) - o,
    )
    out.push({
      coords: [...coords],
      key: chunkKey(coords),
      chunk: { offsets: chunkOffsets, shape: [...chunkShape] },
      box: { offsets: boxOffsets, shape: boxShape },
      inChunk: boxOffsets.map((o, d) => o - chunkOffsets[d]!),
      inBlock: boxOffsets.map((o, d) => o - block.offsets[d]!),
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

/**
 * The chunk of a regular grid that is exactly `block`, or undefined where the block is not
 * aligned to the grid: a saved device block becomes one chunk only when it is one.
 */
export const chunkOfBlock = (
  shape: ReadonlyArray<number>,
  chunkShape: ReadonlyArray<number>,
  block: Slice,
): number[] | undefined => {
  const coords = block.offsets.map((o, d) => o / chunkShape[d]!)
  const aligned = coords.every(
    (c, d) =>
      Number.isInteger(c) && block.shape[d] === Math.min(chunkShape[d]!, shape[d]! - block.offsets[d]!),
  )
  return aligned ? coords : undefined
}

/**
 * Where a box of a row-major array lies when its elements are one contiguous run (start and
 * length in elements), or undefined when they are not: leading dimensions of 1, then one
 * dimension of any extent, then whole trailing dimensions. Such a box moves as a single copy.
 */
export const contiguousRange = (
  shape: ReadonlyArray<number>,
  box: Slice,
): { readonly start: number; readonly length: number } | undefined => {
  const rank = shape.length
  let k = 0
  while (k < rank - 1 && box.shape[k] === 1) k++
  for (let d = k + 1; d < rank; d++) if (box.offsets[d] !== 0 || box.shape[d] !== shape[d]) return undefined
  let start = 0
  for (let d = 0; d < rank; d++) start = start * shape[d]! + box.offsets[d]!
  return { start, length: box.shape.reduce((a, b) => a * b, 1) }
}
