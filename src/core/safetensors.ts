/**
 * The safetensors format, without I/O: an 8-byte little-endian header length, a JSON header
 * (`{ name: { dtype, shape, data_offsets: [begin, end] }, __metadata__?: { string: string } }`,
 * offsets relative to the end of the header), then the raw little-endian data. Also the byte
 * arithmetic that lets a device read only its own block of a tensor, and the sharded-checkpoint
 * index (`model.safetensors.index.json`).
 */
import { Effect, Schema, SchemaIssue } from "effect"
import { type DType, fromSafetensorsDType, itemSize as itemSizeOf, toSafetensorsDType } from "./dtype.ts"
import { formatShape, numel, type Shape, strides } from "./shape.ts"
import type { Slice } from "./sharding.ts"

/** The Rust library's bound; a larger header is a corrupt length, not a real header. */
export const MAX_HEADER_BYTES = 100_000_000

const corrupt = "the file is corrupt or truncated: download or write it again"

// ---------------------------------------------------------------------------------------------
// Errors

export class SafetensorsBadHeaderLength extends Schema.TaggedError<SafetensorsBadHeaderLength>()(
  "SafetensorsBadHeaderLength",
  { file: Schema.String, headerLength: Schema.Number, fileSize: Schema.Number },
) {
  override get message() {
    if (this.fileSize < 8)
      return `${this.file}: ${this.fileSize} bytes is too short for a safetensors file (at least 8); ${corrupt}`
    const why =
      this.headerLength > MAX_HEADER_BYTES
        ? `more than the ${MAX_HEADER_BYTES}-byte limit`
        : `more than the ${this.fileSize - 8} bytes the file holds after the length`
    return `${this.file}: the header length field says ${this.headerLength} bytes, ${why}; ${corrupt} (or it is not a safetensors file)`
  }
}

export class SafetensorsBadHeader extends Schema.TaggedError<SafetensorsBadHeader>()("SafetensorsBadHeader", {
  file: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return `${this.file}: invalid safetensors header: ${this.reason}; ${corrupt}`
  }
}

export class SafetensorsUnsupportedDType extends Schema.TaggedError<SafetensorsUnsupportedDType>()(
  "SafetensorsUnsupportedDType",
  { file: Schema.String, tensor: Schema.String, dtype: Schema.String },
) {
  override get message() {
    const supported = ["F32", "F64", "BF16", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"].join(", ")
    return (
      `${this.file}: tensor "${this.tensor}" has dtype "${this.dtype}", which Magix does not read ` +
      `(supported: ${supported}); convert the checkpoint to one of those (e.g. with safetensors in Python)`
    )
  }
}

export class SafetensorsBadShape extends Schema.TaggedError<SafetensorsBadShape>()("SafetensorsBadShape", {
  file: Schema.String,
  tensor: Schema.String,
  shape: Schema.String,
}) {
  override get message() {
    return `${this.file}: tensor "${this.tensor}" has shape ${this.shape}; every dimension must be a non-negative integer (and the element count a safe integer); ${corrupt}`
  }
}

export class SafetensorsBadOffsets extends Schema.TaggedError<SafetensorsBadOffsets>()(
  "SafetensorsBadOffsets",
  {
    file: Schema.String,
    tensor: Schema.String,
    offsets: Schema.String,
    dataSize: Schema.Number,
    reason: Schema.String,
  },
) {
  override get message() {
    return `${this.file}: tensor "${this.tensor}" has data_offsets ${this.offsets}: ${this.reason} (the data section holds ${this.dataSize} bytes); ${corrupt}`
  }
}

export class SafetensorsSizeMismatch extends Schema.TaggedError<SafetensorsSizeMismatch>()(
  "SafetensorsSizeMismatch",
  {
    file: Schema.String,
    tensor: Schema.String,
    dtype: Schema.String,
    shape: Schema.Array(Schema.Number),
    expected: Schema.Number,
    actual: Schema.Number,
  },
) {
  override get message() {
    return (
      `${this.file}: tensor "${this.tensor}" (${this.dtype} ${formatShape(this.shape)}) needs ` +
      `${this.expected} bytes but its data_offsets span ${this.actual}; ${corrupt}`
    )
  }
}

export class SafetensorsOverlap extends Schema.TaggedError<SafetensorsOverlap>()("SafetensorsOverlap", {
  file: Schema.String,
  tensor: Schema.String,
  other: Schema.String,
}) {
  override get message() {
    return `${this.file}: the data of tensors "${this.other}" and "${this.tensor}" overlap; ${corrupt}`
  }
}

export class SafetensorsBadMetadata extends Schema.TaggedError<SafetensorsBadMetadata>()(
  "SafetensorsBadMetadata",
  { file: Schema.String, reason: Schema.String },
) {
  override get message() {
    return `${this.file}: "__metadata__" must map strings to strings, but ${this.reason}; fix the writer of this file or write it again`
  }
}

export type SafetensorsHeaderError =
  | SafetensorsBadHeaderLength
  | SafetensorsBadHeader
  | SafetensorsUnsupportedDType
  | SafetensorsBadShape
  | SafetensorsBadOffsets
  | SafetensorsSizeMismatch
  | SafetensorsOverlap
  | SafetensorsBadMetadata

export class SafetensorsSliceOutOfBounds extends Schema.TaggedError<SafetensorsSliceOutOfBounds>()(
  "SafetensorsSliceOutOfBounds",
  {
    tensor: Schema.String,
    shape: Schema.Array(Schema.Number),
    offsets: Schema.Array(Schema.Number),
    sliceShape: Schema.Array(Schema.Number),
  },
) {
  override get message() {
    return (
      `tensor "${this.tensor}" ${formatShape(this.shape)}: the block at offsets ${formatShape(this.offsets)} ` +
      `of shape ${formatShape(this.sliceShape)} does not lie inside it; the sharding was computed for a different shape`
    )
  }
}

/** A tensor handed to the writer contradicts itself (or another tensor). */
export class SafetensorsBadTensorInput extends Schema.TaggedError<SafetensorsBadTensorInput>()(
  "SafetensorsBadTensorInput",
  { tensor: Schema.String, reason: Schema.String },
) {
  override get message() {
    return `cannot write tensor "${this.tensor}" to safetensors: ${this.reason}`
  }
}

// ---------------------------------------------------------------------------------------------
// Header

export interface TensorEntry {
  readonly name: string
  readonly dtype: DType
  readonly shape: ReadonlyArray<number>
  /** Absolute file offset of the first byte. */
  readonly begin: number
  /** Absolute file offset one past the last byte. */
  readonly end: number
}

export interface SafetensorsHeader {
  readonly file: string
  /** In header order. */
  readonly entries: ReadonlyMap<string, TensorEntry>
  readonly metadata: Readonly<Record<string, string>> | undefined
  /** Bytes of JSON after the 8-byte length. */
  readonly headerLength: number
  /** Absolute offset of the data section: 8 + headerLength. */
  readonly dataStart: number
}

/**
 * The header length from the first 8 bytes of a file, checked against the file size and the
 * sanity bound before anything allocates that much.
 */
export const readHeaderLength = (
  prefix: Uint8Array,
  fileSize: number,
  file: string,
): Effect.Effect<number, SafetensorsBadHeaderLength> =>
  Effect.suspend(() => {
    if (fileSize < 8 || prefix.byteLength < 8)
      return Effect.fail(
        new SafetensorsBadHeaderLength({
          file,
          headerLength: 0,
          fileSize: Math.min(fileSize, prefix.byteLength),
        }),
      )
    const big = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true)
    const n = Number(big)
    if (big > BigInt(MAX_HEADER_BYTES) || n > fileSize - 8)
      return Effect.fail(new SafetensorsBadHeaderLength({ file, headerLength: n, fileSize }))
    return Effect.succeed(n)
  })

const isPlainObject = (u: unknown): u is Record<string, unknown> =>
  typeof u === "object" && u !== null && !Array.isArray(u)

const showJson = (u: unknown): string => {
  try {
    const s = JSON.stringify(u)
    return s === undefined ? String(u) : s.length > 80 ? `${s.slice(0, 77)}...` : s
  } catch {
    return String(u)
  }
}

const parseMetadata = (
  u: unknown,
  file: string,
): Effect.Effect<Readonly<Record<string, string>> | undefined, SafetensorsBadMetadata> => {
  // serde reads `null` as an absent Option
  if (u === null || u === undefined) return Effect.succeed(undefined)
  if (!isPlainObject(u))
    return Effect.fail(new SafetensorsBadMetadata({ file, reason: `it is ${showJson(u)}` }))
  for (const [k, v] of Object.entries(u))
    if (typeof v !== "string")
      return Effect.fail(new SafetensorsBadMetadata({ file, reason: `key "${k}" holds ${showJson(v)}` }))
  return Effect.succeed(Object.fromEntries(Object.entries(u)) as Record<string, string>)
}

const parseEntry = (
  name: string,
  u: unknown,
  file: string,
  dataStart: number,
  dataSize: number,
): Effect.Effect<TensorEntry, SafetensorsHeaderError> =>
  Effect.suspend((): Effect.Effect<TensorEntry, SafetensorsHeaderError> => {
    if (!isPlainObject(u))
      return Effect.fail(
        new SafetensorsBadHeader({
          file,
          reason: `tensor "${name}" is ${showJson(u)}, not an object with dtype, shape and data_offsets`,
        }),
      )
    const { dtype: rawDType, shape: rawShape, data_offsets: rawOffsets } = u
    if (typeof rawDType !== "string")
      return Effect.fail(
        new SafetensorsBadHeader({
          file,
          reason: `tensor "${name}" has dtype ${showJson(rawDType)}, not a string`,
        }),
      )
    const dtype = fromSafetensorsDType(rawDType)
    if (dtype === undefined)
      return Effect.fail(new SafetensorsUnsupportedDType({ file, tensor: name, dtype: rawDType }))
    if (
      !Array.isArray(rawShape) ||
      !rawShape.every((d): d is number => typeof d === "number" && Number.isSafeInteger(d) && d >= 0) ||
      !Number.isSafeInteger(numel(rawShape) * itemSizeOf(dtype))
    )
      return Effect.fail(new SafetensorsBadShape({ file, tensor: name, shape: showJson(rawShape) }))
    const shape: number[] = [...rawShape]
    const offsets = showJson(rawOffsets)
    const bad = (reason: string) =>
      Effect.fail(new SafetensorsBadOffsets({ file, tensor: name, offsets, dataSize, reason }))
    if (
      !Array.isArray(rawOffsets) ||
      rawOffsets.length !== 2 ||
      !rawOffsets.every((o): o is number => typeof o === "number" && Number.isSafeInteger(o) && o >= 0)
    )
      return bad("expected two non-negative integers [begin, end]")
    const [b, e] = rawOffsets as [number, number]
    if (e < b) return bad("end comes before begin")
    if (e > dataSize) return bad("they run past the end of the file")
    const expected = numel(shape) * itemSizeOf(dtype)
    if (e - b !== expected)
      return Effect.fail(
        new SafetensorsSizeMismatch({ file, tensor: name, dtype: rawDType, shape, expected, actual: e - b }),
      )
    return Effect.succeed({ name, dtype, shape, begin: dataStart + b, end: dataStart + e })
  })

const utf8 = new TextDecoder("utf-8", { fatal: true })

/**
 * Parses and validates a header. `bytes` starts at offset 0 of the file and holds at least the
 * 8-byte length and the header; `fileSize` bounds every offset; `file` names it in errors.
 */
export const parseHeader = (
  bytes: Uint8Array,
  fileSize: number,
  file: string,
): Effect.Effect<SafetensorsHeader, SafetensorsHeaderError> =>
  Effect.gen(function* () {
    const headerLength = yield* readHeaderLength(bytes, fileSize, file)
    const dataStart = 8 + headerLength
    if (bytes.byteLength < dataStart)
      return yield* new SafetensorsBadHeader({
        file,
        reason: `only ${bytes.byteLength - 8} of the header's ${headerLength} bytes were given`,
      })
    let json: unknown
    try {
      json = JSON.parse(utf8.decode(bytes.subarray(8, dataStart)))
    } catch (e) {
      return yield* new SafetensorsBadHeader({
        file,
        reason: `the header is not UTF-8 JSON (${e instanceof Error ? e.message : String(e)})`,
      })
    }
    if (!isPlainObject(json))
      return yield* new SafetensorsBadHeader({
        file,
        reason: `the header is ${showJson(json)}, not a JSON object`,
      })
    const dataSize = fileSize - dataStart
    let metadata: Readonly<Record<string, string>> | undefined
    const entries = new Map<string, TensorEntry>()
    for (const [name, value] of Object.entries(json)) {
      if (name === "__metadata__") metadata = yield* parseMetadata(value, file)
      else entries.set(name, yield* parseEntry(name, value, file, dataStart, dataSize))
    }
    // Empty tensors own no bytes, so they cannot overlap anything.
    const placed = [...entries.values()].filter((e) => e.end > e.begin).sort((a, b) => a.begin - b.begin)
    for (let i = 1; i < placed.length; i++)
      if (placed[i]!.begin < placed[i - 1]!.end)
        return yield* new SafetensorsOverlap({ file, tensor: placed[i]!.name, other: placed[i - 1]!.name })
    return { file, entries, metadata, headerLength, dataStart }
  })

export interface TensorToWrite {
  readonly name: string
  readonly dtype: DType
  readonly shape: ReadonlyArray<number>
  readonly byteLength: number
}

export interface SerializedHeader {
  /** The 8-byte length and the space-padded JSON: write it at offset 0. */
  readonly header: Uint8Array
  /** Where each tensor's bytes go (absolute offsets), in the order they follow the header. */
  readonly offsets: ReadonlyArray<{ readonly name: string; readonly begin: number; readonly end: number }>
  /** Header plus data. */
  readonly fileSize: number
}

/**
 * The header for `tensors`, with their data laid out largest item size first (as the Rust
 * library does), so that every tensor starts aligned to its element size in the file.
 */
export const serializeHeader = (
  tensors: ReadonlyArray<TensorToWrite>,
  metadata?: Readonly<Record<string, string>>,
): Effect.Effect<SerializedHeader, SafetensorsBadTensorInput> =>
  Effect.suspend(() => {
    const seen = new Set<string>()
    for (const t of tensors) {
      const bad = (reason: string) => Effect.fail(new SafetensorsBadTensorInput({ tensor: t.name, reason }))
      if (t.name === "__metadata__") return bad("the name __metadata__ is reserved by the format; rename it")
      if (seen.has(t.name)) return bad("the name appears twice; tensor names must be unique")
      seen.add(t.name)
      if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
        return bad(`shape ${formatShape(t.shape)} has a dimension that is not a non-negative integer`)
      const expected = numel(t.shape) * itemSizeOf(t.dtype)
      if (t.byteLength !== expected)
        return bad(
          `${t.dtype} ${formatShape(t.shape)} needs ${expected} bytes but its data has ${t.byteLength}`,
        )
    }
    const order = tensors
      .map((t, i) => ({ t, i }))
      .sort((a, b) => itemSizeOf(b.t.dtype) - itemSizeOf(a.t.dtype) || a.i - b.i)
      .map(({ t }) => t)
    // Written pair by pair, in data order: an object literal would reorder integer-like names
    // and treat a tensor named "__proto__" as the prototype.
    const pairs: string[] = []
    const pair = (key: string, value: unknown) =>
      pairs.push(`${JSON.stringify(key)}:${JSON.stringify(value)}`)
    if (metadata !== undefined) pair("__metadata__", Object.fromEntries(Object.entries(metadata)))
    let offset = 0
    const relative: Array<{ name: string; begin: number; end: number }> = []
    for (const t of order) {
      pair(t.name, {
        dtype: toSafetensorsDType(t.dtype),
        shape: [...t.shape],
        data_offsets: [offset, offset + t.byteLength],
      })
      relative.push({ name: t.name, begin: offset, end: offset + t.byteLength })
      offset += t.byteLength
    }
    const text = new TextEncoder().encode(`{${pairs.join(",")}}`)
    const padded = Math.ceil(text.byteLength / 8) * 8
    const header = new Uint8Array(8 + padded).fill(0x20)
    new DataView(header.buffer).setBigUint64(0, BigInt(padded), true)
    header.set(text, 8)
    const dataStart = 8 + padded
    return Effect.succeed({
      header,
      offsets: relative.map((r) => ({ name: r.name, begin: dataStart + r.begin, end: dataStart + r.end })),
      fileSize: dataStart + offset,
    })
  })

// ---------------------------------------------------------------------------------------------
// Slices

/** One contiguous read: `length` bytes at file offset `offset`, landing at `destination` in the slice's buffer. */
export interface ByteRun {
  readonly offset: number
  readonly length: number
  readonly destination: number
}

export const checkSlice = (
  tensor: string,
  shape: Shape,
  slice: Slice,
): Effect.Effect<void, SafetensorsSliceOutOfBounds> => {
  const ok =
    slice.offsets.length === shape.length &&
    slice.shape.length === shape.length &&
    shape.every((d, i) => {
      const o = slice.offsets[i]!
      const s = slice.shape[i]!
      return Number.isSafeInteger(o) && Number.isSafeInteger(s) && o >= 0 && s >= 0 && o + s <= d
    })
  return ok
    ? Effect.void
    : Effect.fail(
        new SafetensorsSliceOutOfBounds({
          tensor,
          shape: [...shape],
          offsets: [...slice.offsets],
          sliceShape: [...slice.shape],
        }),
      )
}

/**
 * The byte runs holding block `slice` of a tensor, in the row-major order of the block, each
 * as long as possible: trailing dimensions the block covers whole fold into one run with the
 * first partial dimension, so a block of whole rows is a single read. Nothing outside the block
 * is ever read.
 */
export const sliceByteRuns = (
  entry: TensorEntry,
  slice: Slice,
  itemSize: number = itemSizeOf(entry.dtype),
): Effect.Effect<ReadonlyArray<ByteRun>, SafetensorsSliceOutOfBounds> =>
  Effect.map(checkSlice(entry.name, entry.shape, slice), () =>
    runsOf(entry.begin, entry.shape, slice, itemSize),
  )

const runsOf = (begin: number, shape: Shape, slice: Slice, item: number): ByteRun[] => {
  const rank = shape.length
  if (rank === 0) return [{ offset: begin, length: item, destination: 0 }]
  if (numel(slice.shape) === 0) return []
  // j: the outermost dimension such that every dimension after it is taken whole.
  let j = rank - 1
  while (j > 0 && slice.shape[j] === shape[j]) j--
  const st = strides(shape)
  const runLength = slice.shape[j]! * st[j]! * item
  const base = slice.offsets.reduce((acc, o, d) => acc + o * st[d]!, 0)
  const runs: ByteRun[] = []
  const index = new Array<number>(j).fill(0)
  let destination = 0
  for (;;) {
    let element = base
    for (let d = 0; d < j; d++) element += index[d]! * st[d]!
    const offset = begin + element * item
    const last = runs[runs.length - 1]
    if (last !== undefined && last.offset + last.length === offset)
      runs[runs.length - 1] = { ...last, length: last.length + runLength }
    else runs.push({ offset, length: runLength, destination })
    destination += runLength
    let d = j - 1
    while (d >= 0) {
      index[d]!++
      if (index[d]! < slice.shape[d]!) break
      index[d] = 0
      d--
    }
    if (d < 0) return runs
  }
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints: model.safetensors.index.json

export const INDEX_FILE = "model.safetensors.index.json"

export class InvalidWeightIndex extends Schema.TaggedError<InvalidWeightIndex>()("InvalidWeightIndex", {
  file: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return `${this.file}: not a valid safetensors index (${this.reason}); it must be { "metadata"?: {...}, "weight_map": { tensor: file } }: download it again`
  }
}

export class UnsafeIndexPath extends Schema.TaggedError<UnsafeIndexPath>()("UnsafeIndexPath", {
  file: Schema.String,
  tensor: Schema.String,
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return (
      `${this.file}: weight_map sends "${this.tensor}" to ${JSON.stringify(this.path)}, which ${this.reason}; ` +
      "an index may only name files inside the model directory: fix or re-download the index"
    )
  }
}

export interface WeightIndex {
  readonly file: string
  readonly metadata: Readonly<Record<string, unknown>> | undefined
  /** Tensor name → file name relative to the model directory. */
  readonly weightMap: ReadonlyMap<string, string>
  /** Every file the index names, once each, sorted. */
  readonly files: ReadonlyArray<string>
}

const IndexJson = Schema.Struct({
  metadata: Schema.optional(Schema.NullOr(Schema.Record(Schema.String, Schema.Unknown))),
  weight_map: Schema.Record(Schema.String, Schema.String),
})

/**
 * Why `path` (a file name from an index) could leave the model directory, or undefined if it
 * stays inside. Symlinks are the reader's to check: this sees only the name.
 */
export const unsafePathReason = (path: string): string | undefined => {
  if (path.length === 0) return "is empty"
  if (path.includes("\0")) return "contains a NUL byte"
  if (path.includes("\\")) return "contains a backslash"
  if (path.startsWith("/") || /^[A-Za-z]:/.test(path)) return "is an absolute path"
  if (path.split("/").includes("..")) return 'has a ".." segment'
  return undefined
}

/** The first problem Schema found, as a dotted field path and its message. */
const describeSchemaIssue = (issue: SchemaIssue.Issue): { path: string; message: string } => {
  const first = SchemaIssue.makeFormatterStandardSchemaV1()(issue).issues[0]
  const path = (first?.path ?? [])
    .map((p) => String(typeof p === "object" && p !== null && "key" in p ? p.key : p))
    .join(".")
  return { path, message: first?.message ?? "invalid" }
}

/** Parses and checks the index; `file` names it in errors. */
export const parseIndex = (
  text: string,
  file: string,
): Effect.Effect<WeightIndex, InvalidWeightIndex | UnsafeIndexPath> =>
  Effect.gen(function* () {
    let json: unknown
    try {
      json = JSON.parse(text)
    } catch (e) {
      return yield* new InvalidWeightIndex({
        file,
        reason: `not JSON: ${e instanceof Error ? e.message : String(e)}`,
      })
    }
    const decoded = yield* Schema.decodeUnknownEffect(IndexJson)(json).pipe(
      Effect.mapError((e) => {
        const { path, message } = describeSchemaIssue(e.issue)
        return new InvalidWeightIndex({ file, reason: path ? `${path}: ${message}` : message })
      }),
    )
    const weightMap = new Map<string, string>()
    for (const [tensor, path] of Object.entries(decoded.weight_map)) {
      const reason = unsafePathReason(path)
      if (reason !== undefined) return yield* new UnsafeIndexPath({ file, tensor, path, reason })
      weightMap.set(tensor, path)
    }
    if (weightMap.size === 0) return yield* new InvalidWeightIndex({ file, reason: "weight_map is empty" })
    return {
      file,
      metadata: decoded.metadata ?? undefined,
      weightMap,
      files: [...new Set(weightMap.values())].sort(),
    }
  })

export interface WeightIndexJson {
  readonly metadata: { readonly total_size: number }
  readonly weight_map: Readonly<Record<string, string>>
}

/** The index `transformers` writes: total data bytes, and the tensors sorted by name. */
export const makeIndex = (
  weightMap: ReadonlyMap<string, string> | Readonly<Record<string, string>>,
  totalSize: number,
): WeightIndexJson => {
  const pairs = weightMap instanceof Map ? [...weightMap.entries()] : Object.entries(weightMap)
  pairs.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
  return { metadata: { total_size: totalSize }, weight_map: Object.fromEntries(pairs) }
}
