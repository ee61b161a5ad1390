/**
 * Dataset files as numbered examples with random access, which a shuffled epoch needs.
 *
 * - `.jsonl` (and `.json` Lines) and `.txt`: one pass streams the file once, chunk by chunk, and
 *   records where each line starts; an example is then one positional read of its bytes. The
 *   offsets live in SharedArrayBuffers, so worker threads share one index without copying it.
 *   JSON is parsed when an example is read: a malformed line is reported (with its file and
 *   line) by the batch that needs it; the first example of each file is checked on opening, so
 *   a wrong field name fails at once.
 * - `.parquet` (hyparquet): the file's metadata gives row counts per row group; a row group's
 *   column of the chosen field is decoded on first use and kept, so random access costs one
 *   decode per row group (memory: that column, per reading thread).
 */
import * as fs from "node:fs"
import * as zlib from "node:zlib"
import {
  type AsyncBuffer,
  type CompressionCodec,
  type Compressors,
  type FileMetaData,
  parquetMetadataAsync,
  parquetReadObjects,
  parquetSchema,
} from "hyparquet"
import {
  DatasetEmpty,
  DatasetFieldMissing,
  DatasetFileError,
  DatasetFormatUnsupported,
  DatasetParseError,
} from "../../core/data/errors.ts"
import { type Example, type RowLocation, selectField } from "../../core/data/examples.ts"
import { type DataFileKind, kindOf } from "./files.ts"

export interface IndexedFile {
  /** The local path. */
  readonly path: string
  /** As errors name it: the path given, or the file's path in its repository. */
  readonly name: string
  readonly kind: DataFileKind
  readonly count: number
  /** jsonl and txt: byte offset of each example's line. */
  readonly starts?: Float64Array
  /** jsonl and txt: byte length of each line, without its newline. */
  readonly lengths?: Uint32Array
  /** jsonl and txt: 1-based line number of each example (blank lines of .jsonl are skipped). */
  readonly lines?: Uint32Array
  /** parquet: rows per row group. */
  readonly rowGroups?: ReadonlyArray<number>
}

/** A dataset's files, indexed: plain data that can be posted to a worker thread. */
export interface DatasetIndex {
  /** As the user named the dataset. */
  readonly name: string
  /** The field each example is read from (.txt lines are examples themselves). */
  readonly field: string
  readonly files: ReadonlyArray<IndexedFile>
  /** Examples in all files. */
  readonly count: number
}

const describe = (e: unknown) => (e instanceof Error ? e.message : String(e))

// ---------------------------------------------------------------------------------------------
// Indexing

/** A typed array that grows by doubling, copied into shared memory at the end. */
class Growing<T extends Float64Array | Uint32Array> {
  private data: T
  length = 0
  constructor(private readonly Kind: { new (length: number): T; new (buffer: SharedArrayBuffer): T }) {
    this.data = new Kind(1024)
  }
  push(v: number) {
    if (this.length === this.data.length) {
      const bigger = new this.Kind(this.data.length * 2)
      bigger.set(this.data)
      this.data = bigger
    }
    this.data[this.length++] = v
  }
  shared(): T {
    const out = new this.Kind(new SharedArrayBuffer(this.length * this.data.BYTES_PER_ELEMENT))
    out.set(this.data.subarray(0, this.length))
    return out
  }
}

const CHUNK = 1 << 22

/**
 * Streams a text file once and records each line: for .jsonl its non-blank lines, for .txt every
 * line (a final newline does not start another one).
 */
const indexLines = async (file: string, name: string, kind: "jsonl" | "txt"): Promise<IndexedFile> => {
  const starts = new Growing<Float64Array>(Float64Array)
  const lengths = new Growing<Uint32Array>(Uint32Array)
  const lines = new Growing<Uint32Array>(Uint32Array)
  const handle = await fs.promises.open(file, "r").catch((e) => {
    throw new DatasetFileError({ file: name, detail: describe(e) })
  })
  try {
    const buf = Buffer.allocUnsafe(CHUNK)
    let pos = 0
    let lineStart = 0
    let line = 1
    let blank = true
    const emit = (end: number) => {
      if (kind === "txt" || !blank) {
        starts.push(lineStart)
        lengths.push(end - lineStart)
        lines.push(line)
      }
    }
    for (;;) {
      const { bytesRead } = await handle.read(buf, 0, CHUNK, pos).catch((e) => {
        throw new DatasetFileError({ file: name, detail: describe(e) })
      })
      if (bytesRead === 0) break
      let i = 0
      while (i < bytesRead) {
        const found = buf.indexOf(10, i)
        const nl = found === -1 || found >= bytesRead ? -1 : found
        const end = nl === -1 ? bytesRead : nl
        if (blank)
          for (let k = i; k < end; k++) {
            const c = buf[k]!
            if (c !== 32 && c !== 9 && c !== 13) {
              blank = false
              break
            }
          }
        if (nl === -1) break
        emit(pos + nl)
        lineStart = pos + nl + 1
        line++
        blank = true
        i = nl + 1
      }
      pos += bytesRead
    }
    if (pos > lineStart) emit(pos)
  } finally {
    await handle.close()
  }
  if (starts.length === 0) throw new DatasetEmpty({ file: name })
  return {
    path: file,
    name,
    kind,
    count: starts.length,
    starts: starts.shared(),
    lengths: lengths.shared(),
    lines: lines.shared(),
  }
}

/** Codecs hyparquet decodes itself (uncompressed, snappy) or with Node's zlib here (gzip, brotli). */
const compressors: Compressors = {
  GZIP: (input) => new Uint8Array(zlib.unzipSync(input)),
  BROTLI: (input) => new Uint8Array(zlib.brotliDecompressSync(input)),
}
const decodable = new Set<CompressionCodec>(["UNCOMPRESSED", "SNAPPY", "GZIP", "BROTLI"])

/** A file read with positional reads of exactly the requested bytes. */
const fileBuffer = (fd: number, size: number): AsyncBuffer => ({
  byteLength: size,
  slice: (start, end = size) => {
    const out = new Uint8Array(end - start)
    let done = 0
    while (done < out.length) {
      const n = fs.readSync(fd, out, done, out.length - done, start + done)
      if (n === 0)
        throw new Error(`the file ended at byte ${start + done} of ${size}; it changed while being read`)
      done += n
    }
    return out.buffer
  },
})

const openParquet = async (file: string, name: string) => {
  let fd: number
  try {
    fd = fs.openSync(file, "r")
  } catch (e) {
    throw new DatasetFileError({ file: name, detail: describe(e) })
  }
  try {
    const buffer = fileBuffer(fd, fs.fstatSync(fd).size)
    const metadata = await parquetMetadataAsync(buffer).catch((e) => {
      throw new DatasetFormatUnsupported({
        file: name,
        detail: `not a readable Parquet file (${describe(e)})`,
        fix: "Check that the download is complete, or convert the data to .jsonl",
      })
    })
    checkParquetLayout(metadata, name)
    return { fd, buffer, metadata }
  } catch (e) {
    fs.closeSync(fd)
    throw e
  }
}

/**
 * Checks that every column chunk of every row group is one leaf of the schema, once. hyparquet
 * starts decoding each chunk of a read before it matches chunks to the schema, so a chunk that
 * matches no leaf (or a second time) is decoded unobserved: damaged, it rejects with nobody
 * listening, and an unhandled rejection ends the process.
 */
const checkParquetLayout = (metadata: FileMetaData, name: string): void => {
  const bad = (detail: string) =>
    new DatasetFormatUnsupported({
      file: name,
      detail: `not a readable Parquet file (${detail})`,
      fix: "Check that the download is complete, or convert the data to .jsonl",
    })
  const leaves = new Set<string>()
  try {
    const visit = (node: ReturnType<typeof parquetSchema>) => {
      if (node.children.length === 0) leaves.add(JSON.stringify(node.path))
      for (const child of node.children) visit(child)
    }
    for (const child of parquetSchema(metadata).children) visit(child)
  } catch (e) {
    throw bad(`its schema cannot be read: ${describe(e)}`)
  }
  metadata.row_groups.forEach((group, g) => {
    const seen = new Set<string>()
    for (const column of group.columns) {
      const path = column.meta_data?.path_in_schema
      if (path === undefined) continue
      const key = JSON.stringify(path)
      if (!leaves.has(key) || seen.has(key))
        throw bad(
          `row group ${g} holds column ${path.join(".")}, which is not a column of its schema or appears twice`,
        )
      seen.add(key)
    }
  })
}

/** Top-level columns, and the codecs of the chosen one. */
const parquetColumns = (metadata: FileMetaData, field: string) => {
  const columns = parquetSchema(metadata).children.map((c) => c.element.name)
  const codecs = new Set<CompressionCodec>()
  for (const g of metadata.row_groups)
    for (const c of g.columns) if (c.meta_data?.path_in_schema[0] === field) codecs.add(c.meta_data.codec)
  return { columns, codecs }
}

const indexParquet = async (file: string, name: string, field: string): Promise<IndexedFile> => {
  const { fd, metadata } = await openParquet(file, name)
  fs.closeSync(fd)
  const { columns, codecs } = parquetColumns(metadata, field)
  if (!columns.includes(field)) throw new DatasetFieldMissing({ file: name, field, available: columns })
  for (const codec of codecs)
    if (!decodable.has(codec))
      throw new DatasetFormatUnsupported({
        file: name,
        detail: `column "${field}" is compressed with ${codec}, which hyparquet reads only with the hyparquet-compressors package (not installed)`,
        fix: "Write the file with snappy, gzip or no compression (pyarrow: pq.write_table(table, path, compression='snappy')), or convert it to .jsonl",
      })
  const rowGroups = metadata.row_groups.map((g) => Number(g.num_rows))
  const count = rowGroups.reduce((a, b) => a + b, 0)
  if (count === 0) throw new DatasetEmpty({ file: name })
  return { path: file, name, kind: "parquet", count, rowGroups }
}

/** Indexes one local data file; `name` is what errors call it. Throws the typed error. */
export const indexFile = async (file: string, name: string, field: string): Promise<IndexedFile> => {
  const kind = kindOf(file)
  if (kind === undefined)
    throw new DatasetFormatUnsupported({
      file: name,
      detail: "is not a .jsonl, .json (JSON Lines), .parquet or .txt file",
      fix: "Convert it to one of those, or name the file of that kind",
    })
  if (kind === "parquet") return indexParquet(file, name, field)
  return indexLines(file, name, kind)
}

/** Indexes the files of a dataset and checks the first example of each. Throws the typed error. */
export const indexDataset = async (
  name: string,
  files: ReadonlyArray<{ readonly path: string; readonly name: string }>,
  field: string,
): Promise<DatasetIndex> => {
  const indexed: IndexedFile[] = []
  for (const f of files) indexed.push(await indexFile(f.path, f.name, field))
  const index: DatasetIndex = { name, field, files: indexed, count: indexed.reduce((n, f) => n + f.count, 0) }
  const reader = new DocumentReader(index)
  try {
    let first = 0
    for (const f of indexed) {
      // Parquet's columns were checked against the schema; reading a row group here would cost a decode.
      if (f.kind === "jsonl") await reader.read([first])
      first += f.count
    }
  } finally {
    reader.close()
  }
  return index
}

// ---------------------------------------------------------------------------------------------
// Reading

export interface ReadExample {
  readonly example: Example
  readonly at: RowLocation
}

interface ParquetState {
  readonly fd: number
  readonly buffer: AsyncBuffer
  readonly metadata: FileMetaData
  readonly groups: Map<number, Promise<ReadonlyArray<unknown>>>
}

/** Reads examples by number; one per thread (file handles and decoded row groups are its own). */
export class DocumentReader {
  private readonly ends: number[] = []
  private readonly fds = new Map<number, number>()
  private readonly parquet = new Map<number, Promise<ParquetState>>()
  private buf = Buffer.allocUnsafe(1 << 16)

  constructor(readonly index: DatasetIndex) {
    let n = 0
    for (const f of index.files) {
      n += f.count
      this.ends.push(n)
    }
  }

  /** The examples numbered `docs` (0-based over all files). Throws the typed error. */
  async read(docs: ReadonlyArray<number>): Promise<ReadonlyArray<ReadExample>> {
    const out = new Array<ReadExample>(docs.length)
    for (let k = 0; k < docs.length; k++) {
      const doc = docs[k]!
      const f = this.fileOf(doc)
      const file = this.index.files[f]!
      const local = doc - (f === 0 ? 0 : this.ends[f - 1]!)
      out[k] = file.kind === "parquet" ? await this.readRow(f, file, local) : this.readLine(f, file, local)
    }
    return out
  }

  close(): void {
    for (const fd of this.fds.values()) fs.closeSync(fd)
    this.fds.clear()
    for (const p of this.parquet.values())
      p.then(
        (s) => fs.closeSync(s.fd),
        () => undefined,
      )
    this.parquet.clear()
  }

  private fileOf(doc: number): number {
    if (!Number.isInteger(doc) || doc < 0 || doc >= this.index.count)
      throw new RangeError(`example ${doc} of ${this.index.count}`)
    let lo = 0
    let hi = this.ends.length - 1
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      if (doc < this.ends[mid]!) hi = mid
      else lo = mid + 1
    }
    return lo
  }

  private fd(f: number, file: IndexedFile): number {
    let fd = this.fds.get(f)
    if (fd === undefined) {
      try {
        fd = fs.openSync(file.path, "r")
      } catch (e) {
        throw new DatasetFileError({ file: file.name, detail: describe(e) })
      }
      this.fds.set(f, fd)
    }
    return fd
  }

  private readLine(f: number, file: IndexedFile, local: number): ReadExample {
    const start = file.starts![local]!
    let length = file.lengths![local]!
    const line = file.lines![local]!
    if (this.buf.length < length) this.buf = Buffer.allocUnsafe(Math.max(length, this.buf.length * 2))
    const fd = this.fd(f, file)
    let done = 0
    while (done < length) {
      const n = fs.readSync(fd, this.buf, done, length - done, start + done)
      if (n === 0)
        throw new DatasetFileError({
          file: file.name,
          detail: `it became shorter while in use (line ${line})`,
        })
      done += n
    }
    if (length > 0 && this.buf[length - 1] === 13) length-- // a CRLF line ending
    const text = this.buf.toString("utf8", 0, length)
    const at = { file: file.name, line }
    if (file.kind === "txt") return { example: text, at }
    let row: unknown
    try {
      row = JSON.parse(text)
    } catch (e) {
      throw new DatasetParseError({ file: file.name, line, detail: describe(e) })
    }
    if (typeof row !== "object" || row === null || Array.isArray(row))
      throw new DatasetParseError({
        file: file.name,
        line,
        detail: `it holds ${Array.isArray(row) ? "a list" : typeof row}`,
      })
    return { example: selectField(row, this.index.field, at), at }
  }

  private async readRow(f: number, file: IndexedFile, local: number): Promise<ReadExample> {
    let state = this.parquet.get(f)
    if (state === undefined) {
      state = openParquet(file.path, file.name).then((s) => ({ ...s, groups: new Map() }))
      this.parquet.set(f, state)
    }
    const s = await state
    const groups = file.rowGroups!
    let g = 0
    let first = 0
    while (local >= first + groups[g]!) first += groups[g++]!
    let values = s.groups.get(g)
    if (values === undefined) {
      const field = this.index.field
      values = parquetReadObjects({
        file: s.buffer,
        metadata: s.metadata,
        columns: [field],
        rowStart: first,
        rowEnd: first + groups[g]!,
        compressors,
      }).then(
        (rows) => rows.map((r) => r[field] as unknown),
        (e) => {
          throw new DatasetFormatUnsupported({
            file: file.name,
            detail: `row group ${g} cannot be decoded (${describe(e)})`,
            fix: "Check that the file is complete, or convert it to .jsonl",
          })
        },
      )
      s.groups.set(g, values)
    }
    const value = (await values)[local - first]
    const at = { file: file.name, row: local }
    return { example: selectField({ [this.index.field]: value }, this.index.field, at), at }
  }
}
