/**
 * Safetensors files on disk: open one in a Scope (its handle closes with the scope), read a
 * tensor or any block of one with positional reads of exactly the block's bytes, write one
 * atomically, and read a sharded checkpoint through its index. Safetensors data is little-endian,
 * as is every host Magix runs on, so bytes land in typed arrays unchanged.
 */
import { randomBytes } from "node:crypto"
import * as fs from "node:fs/promises"
import * as nodePath from "node:path"
import { Effect, Exit, Schema, Scope } from "effect"
import { bytesOf, type DType, type HostArray, hostArray } from "../core/dtype.ts"
import {
  type ByteRun,
  INDEX_FILE,
  type InvalidWeightIndex,
  parseHeader,
  parseIndex,
  readHeaderLength,
  type SafetensorsBadTensorInput,
  type SafetensorsHeader,
  type SafetensorsHeaderError,
  type SafetensorsSliceOutOfBounds,
  serializeHeader,
  sliceByteRuns,
  type TensorEntry,
  UnsafeIndexPath,
} from "../core/safetensors.ts"
import { numel } from "../core/shape.ts"
import type { Slice } from "../core/sharding.ts"

export const SINGLE_FILE = "model.safetensors"

export class SafetensorsFileNotFound extends Schema.TaggedError<SafetensorsFileNotFound>()(
  "SafetensorsFileNotFound",
  { path: Schema.String, expected: Schema.String },
) {
  override get message() {
    return `${this.path}: no such file or directory; expected ${this.expected} there (check the path, or download the model again)`
  }
}

export class SafetensorsIOError extends Schema.TaggedError<SafetensorsIOError>()("SafetensorsIOError", {
  path: Schema.String,
  operation: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `${this.path}: ${this.operation} failed: ${this.detail}; check the file's permissions and the disk`
  }
}

export class TensorNotFound extends Schema.TaggedError<TensorNotFound>()("TensorNotFound", {
  file: Schema.String,
  tensor: Schema.String,
  known: Schema.Array(Schema.String),
}) {
  override get message() {
    const some = this.known.slice(0, 5).map((n) => `"${n}"`)
    const more = this.known.length > 5 ? `, ... (${this.known.length} in all)` : ""
    return (
      `${this.file} has no tensor "${this.tensor}" (it has ${some.join(", ") || "none"}${more}); ` +
      "the checkpoint does not match the model: check the model type and the file"
    )
  }
}

export class ModelWeightsNotFound extends Schema.TaggedError<ModelWeightsNotFound>()("ModelWeightsNotFound", {
  dir: Schema.String,
}) {
  override get message() {
    return `${this.dir}: found neither ${SINGLE_FILE} nor ${INDEX_FILE}; point at a Hugging Face model directory (or download the model there)`
  }
}

export type SafetensorsOpenError = SafetensorsFileNotFound | SafetensorsIOError | SafetensorsHeaderError
export type SafetensorsReadError = TensorNotFound | SafetensorsSliceOutOfBounds | SafetensorsIOError
export type ModelWeightsError =
  | SafetensorsOpenError
  | ModelWeightsNotFound
  | InvalidWeightIndex
  | UnsafeIndexPath

// ---------------------------------------------------------------------------------------------
// Low-level I/O

/** Most bytes one read or write call moves: Node refuses single calls of 2 GiB or more. */
const CHUNK = 1 << 30
/** Positional reads in flight at once for one slice. */
const READ_CONCURRENCY = 8

class ShortRead extends Error {}

const ioFailure =
  (path: string, operation: string) =>
  (e: unknown): SafetensorsIOError => {
    const detail =
      e instanceof ShortRead
        ? `the file ended early (${e.message}); it changed while open or is truncated`
        : e instanceof Error
          ? e.message
          : String(e)
    return new SafetensorsIOError({ path, operation, detail })
  }

/** As ioFailure, but a missing file says what belongs at the path. */
const ioError =
  (path: string, operation: string, expected = "a .safetensors file") =>
  (e: unknown): SafetensorsFileNotFound | SafetensorsIOError =>
    (e as { code?: string } | null)?.code === "ENOENT"
      ? new SafetensorsFileNotFound({ path, expected })
      : ioFailure(path, operation)(e)

const readExact = async (h: fs.FileHandle, dest: Uint8Array, position: number): Promise<void> => {
  let done = 0
  while (done < dest.byteLength) {
    const want = Math.min(CHUNK, dest.byteLength - done)
    const { bytesRead } = await h.read(dest, done, want, position + done)
    if (bytesRead === 0)
      throw new ShortRead(`wanted ${dest.byteLength} bytes at offset ${position}, got ${done}`)
    done += bytesRead
  }
}

const writeAll = async (h: fs.FileHandle, src: Uint8Array, position: number): Promise<void> => {
  let done = 0
  while (done < src.byteLength) {
    const want = Math.min(CHUNK, src.byteLength - done)
    const { bytesWritten } = await h.write(src, done, want, position + done)
    done += bytesWritten
  }
}

const readRuns = async (
  h: fs.FileHandle,
  runs: ReadonlyArray<ByteRun>,
  dest: Uint8Array,
  signal: AbortSignal,
  onRead: (bytes: number) => void,
): Promise<void> => {
  let next = 0
  const worker = async () => {
    while (next < runs.length) {
      if (signal.aborted) return
      const r = runs[next++]!
      await readExact(h, dest.subarray(r.destination, r.destination + r.length), r.offset)
      onRead(r.length)
    }
  }
  await Promise.all(Array.from({ length: Math.min(READ_CONCURRENCY, runs.length) }, worker))
}

// ---------------------------------------------------------------------------------------------
// One file

export interface SafetensorsFile {
  readonly path: string
  readonly header: SafetensorsHeader
  /** Tensor names in header order. */
  readonly names: ReadonlyArray<string>
  readonly entry: (name: string) => Effect.Effect<TensorEntry, TensorNotFound>
  readonly readTensor: (name: string) => Effect.Effect<HostArray, SafetensorsReadError>
  /** Block `slice` of a tensor, row-major; reads only the block's bytes. */
  readonly readSlice: (name: string, slice: Slice) => Effect.Effect<HostArray, SafetensorsReadError>
  /** Tensor data bytes read so far (the header not included). */
  readonly bytesRead: Effect.Effect<number>
  /** Bytes read to open the file: the 8-byte length and the header. */
  readonly headerBytesRead: number
}

/**
 * Opens a .safetensors file for the life of the current scope, reading only its length prefix
 * and header. `label` names the file in errors (default: `path`).
 */
export const openSafetensors = (
  path: string,
  label: string = path,
): Effect.Effect<SafetensorsFile, SafetensorsOpenError, Scope.Scope> =>
  Effect.gen(function* () {
    const handle = yield* Effect.acquireRelease(
      Effect.tryPromise({ try: () => fs.open(path, "r"), catch: ioError(label, "open") }),
      (h) => Effect.promise(() => h.close().catch(() => undefined)),
    )
    const io = <A>(operation: string, f: (signal: AbortSignal) => Promise<A>) =>
      Effect.tryPromise({ try: f, catch: ioError(label, operation) })
    const stat = yield* io("stat", () => handle.stat())
    if (!stat.isFile())
      return yield* new SafetensorsIOError({
        path: label,
        operation: "open",
        detail: "it is not a regular file",
      })
    const fileSize = stat.size
    const prefix = new Uint8Array(Math.min(8, fileSize))
    yield* io("read", () => readExact(handle, prefix, 0))
    const headerLength = yield* readHeaderLength(prefix, fileSize, label)
    const headerBytes = new Uint8Array(8 + headerLength)
    headerBytes.set(prefix)
    yield* io("read", () => readExact(handle, headerBytes.subarray(8), 8))
    const header = yield* parseHeader(headerBytes, fileSize, label)
    const names = [...header.entries.keys()]
    let bytesRead = 0

    const entry = (name: string) => {
      const e = header.entries.get(name)
      return e !== undefined
        ? Effect.succeed(e)
        : Effect.fail(new TensorNotFound({ file: label, tensor: name, known: names }))
    }
    const readBlock = (e: TensorEntry, slice: Slice) =>
      Effect.gen(function* () {
        const runs = yield* sliceByteRuns(e, slice)
        const out = hostArray(e.dtype, numel(slice.shape))
        const dest = bytesOf(out)
        yield* Effect.tryPromise({
          try: (signal) =>
            readRuns(handle, runs, dest, signal, (n) => {
              bytesRead += n
            }),
          catch: ioFailure(label, "read"),
        })
        return out
      })
    return {
      path: label,
      header,
      names,
      entry,
      readTensor: (name) =>
        Effect.flatMap(entry(name), (e) => readBlock(e, { offsets: e.shape.map(() => 0), shape: e.shape })),
      readSlice: (name, slice) => Effect.flatMap(entry(name), (e) => readBlock(e, slice)),
      bytesRead: Effect.sync(() => bytesRead),
      headerBytesRead: headerBytes.byteLength,
    } satisfies SafetensorsFile
  })

// ---------------------------------------------------------------------------------------------
// Writing

export interface TensorData {
  readonly name: string
  readonly dtype: DType
  readonly shape: ReadonlyArray<number>
  /** Little-endian element bytes, row-major (16-bit floats as their raw bits). */
  readonly data: ArrayBufferView
}

/**
 * Writes a .safetensors file: to a temporary name beside `path`, synced, then renamed over it,
 * so a crash never leaves a partial file under the real name.
 */
export const writeSafetensors = (
  path: string,
  tensors: ReadonlyArray<TensorData>,
  metadata?: Readonly<Record<string, string>>,
): Effect.Effect<void, SafetensorsBadTensorInput | SafetensorsFileNotFound | SafetensorsIOError> =>
  Effect.gen(function* () {
    const { header, offsets } = yield* serializeHeader(
      tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.data.byteLength })),
      metadata,
    )
    const data = new Map(tensors.map((t) => [t.name, bytesOf(t.data)]))
    const dir = nodePath.dirname(path)
    const tmp = nodePath.join(
      dir,
      `.${nodePath.basename(path)}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`,
    )
    const expected = "a directory to write the safetensors file into"
    const write = Effect.scoped(
      Effect.gen(function* () {
        const handle = yield* Effect.acquireRelease(
          Effect.tryPromise({ try: () => fs.open(tmp, "wx"), catch: ioError(tmp, "create", expected) }),
          (h) => Effect.promise(() => h.close().catch(() => undefined)),
        )
        yield* Effect.tryPromise({
          try: async () => {
            await writeAll(handle, header, 0)
            for (const o of offsets) await writeAll(handle, data.get(o.name)!, o.begin)
            await handle.sync()
          },
          catch: ioError(tmp, "write"),
        })
      }),
    )
    yield* write.pipe(
      Effect.andThen(
        Effect.tryPromise({ try: () => fs.rename(tmp, path), catch: ioError(path, "rename", expected) }),
      ),
      Effect.onError(() => Effect.promise(() => fs.rm(tmp, { force: true }).catch(() => undefined))),
    )
    // Make the rename itself durable; some filesystems refuse to sync a directory, which is fine.
    yield* Effect.promise(async () => {
      const d = await fs.open(dir, "r").catch(() => undefined)
      await d
        ?.sync()
        .catch(() => undefined)
        .finally(() => d.close().catch(() => undefined))
    })
  })

// ---------------------------------------------------------------------------------------------
// A model directory: one file, or shards named by an index

export interface ModelWeights {
  readonly dir: string
  /** Every tensor, in index (or header) order. */
  readonly names: ReadonlyArray<string>
  /** File names relative to `dir`. */
  readonly files: ReadonlyArray<string>
  readonly fileOf: (tensor: string) => string | undefined
  /** The open file, opened on first use and closed with the scope of `openModelWeights`. */
  readonly open: (file: string) => Effect.Effect<SafetensorsFile, SafetensorsOpenError>
  readonly entry: (tensor: string) => Effect.Effect<TensorEntry, SafetensorsOpenError | TensorNotFound>
  readonly readTensor: (
    tensor: string,
  ) => Effect.Effect<HostArray, SafetensorsOpenError | SafetensorsReadError>
  readonly readSlice: (
    tensor: string,
    slice: Slice,
  ) => Effect.Effect<HostArray, SafetensorsOpenError | SafetensorsReadError>
  /** Files opened so far. */
  readonly opened: Effect.Effect<ReadonlyArray<string>>
  /** Tensor data bytes read so far, over every file. */
  readonly bytesRead: Effect.Effect<number>
}

const isInside = (real: string, root: string) =>
  real === root || real.startsWith(root.endsWith(nodePath.sep) ? root : root + nodePath.sep)

/**
 * Where files of `dir` may resolve to: the directory itself and, in the Hugging Face cache
 * layout (`models--org--name/snapshots/<rev>/file` → `../../blobs/<hash>`), that repo's blobs.
 */
const allowedRoots = (dir: string, realDir: string): Effect.Effect<ReadonlyArray<string>> =>
  Effect.promise(async () => {
    const roots = [realDir]
    for (const d of new Set([nodePath.resolve(dir), realDir]))
      if (nodePath.basename(nodePath.dirname(d)) === "snapshots") {
        const blobs = await fs.realpath(nodePath.join(d, "..", "..", "blobs")).catch(() => undefined)
        if (blobs !== undefined) roots.push(blobs)
      }
    return roots
  })

/**
 * Opens the weights of a Hugging Face model directory for the life of the current scope: a
 * sharded checkpoint through `model.safetensors.index.json` (shards opened when first read),
 * else `model.safetensors`. Every file must resolve, symlinks followed, inside the directory
 * (or its Hugging Face cache blobs).
 */
export const openModelWeights = (dir: string): Effect.Effect<ModelWeights, ModelWeightsError, Scope.Scope> =>
  Effect.gen(function* () {
    const scope = yield* Effect.scope
    const realDir = yield* Effect.tryPromise({
      try: () => fs.realpath(dir),
      catch: ioError(dir, "open", `a model directory holding ${SINGLE_FILE} or ${INDEX_FILE}`),
    })
    const roots = yield* allowedRoots(dir, realDir)
    const indexPath = nodePath.join(dir, INDEX_FILE)
    const indexText = yield* Effect.tryPromise({
      try: () => fs.readFile(indexPath, "utf8"),
      catch: ioError(indexPath, "read", `the checkpoint index ${INDEX_FILE}`),
    }).pipe(Effect.catchTag("SafetensorsFileNotFound", () => Effect.succeed(undefined)))

    const resolveInside = (file: string, tensor: string, indexLabel: string, expected: string) =>
      Effect.gen(function* () {
        const joined = nodePath.join(dir, file)
        const real = yield* Effect.tryPromise({
          try: () => fs.realpath(joined),
          catch: ioError(joined, "open", expected),
        })
        if (!roots.some((root) => isInside(real, root)))
          return yield* new UnsafeIndexPath({
            file: indexLabel,
            tensor,
            path: file,
            reason: `resolves (through a symlink) to ${real}, outside the model directory ${realDir}`,
          })
        return real
      })

    let weightMap: ReadonlyMap<string, string>
    const reals = new Map<string, string>()
    const preopened = new Map<string, SafetensorsFile>()
    if (indexText !== undefined) {
      const index = yield* parseIndex(indexText, indexPath)
      weightMap = index.weightMap
      const firstTensor = new Map<string, string>()
      for (const [tensor, file] of weightMap) if (!firstTensor.has(file)) firstTensor.set(file, tensor)
      for (const file of index.files) {
        const tensor = firstTensor.get(file)!
        const expected = `the shard that ${INDEX_FILE} names for "${tensor}"`
        reals.set(file, yield* resolveInside(file, tensor, indexPath, expected))
      }
    } else {
      const single = nodePath.join(dir, SINGLE_FILE)
      const exists = yield* Effect.promise(() =>
        fs.lstat(single).then(
          () => true,
          () => false,
        ),
      )
      if (!exists) return yield* new ModelWeightsNotFound({ dir })
      const real = yield* resolveInside(SINGLE_FILE, "(every tensor)", single, `the model's ${SINGLE_FILE}`)
      const file = yield* openSafetensors(real, single)
      reals.set(SINGLE_FILE, real)
      preopened.set(SINGLE_FILE, file)
      weightMap = new Map(file.names.map((n) => [n, SINGLE_FILE]))
    }

    const opened = new Map<string, SafetensorsFile>(preopened)
    const openers = new Map<string, Effect.Effect<SafetensorsFile, SafetensorsOpenError>>()
    for (const [file, real] of reals) {
      const pre = preopened.get(file)
      const opener =
        pre !== undefined
          ? Effect.succeed(pre)
          : Effect.gen(function* () {
              // A child scope, so a shard that fails to open closes its handle at once.
              const child = yield* Scope.fork(scope)
              const f = yield* openSafetensors(real, nodePath.join(dir, file)).pipe(
                Scope.provide(child),
                Effect.onError((cause) => Scope.close(child, Exit.failCause(cause))),
              )
              opened.set(file, f)
              return f
            })
      openers.set(file, yield* Effect.cached(opener))
    }
    const files = [...reals.keys()]
    const names = [...weightMap.keys()]
    const notFound = (tensor: string) =>
      new TensorNotFound({
        file: indexText !== undefined ? indexPath : nodePath.join(dir, SINGLE_FILE),
        tensor,
        known: names,
      })

    const open = (file: string) =>
      openers.get(file) ??
      Effect.fail(
        new SafetensorsFileNotFound({
          path: nodePath.join(dir, file),
          expected: `a file of this checkpoint, but it is not one of ${files.join(", ")}`,
        }),
      )
    const fileFor = (tensor: string) =>
      Effect.gen(function* () {
        const name = weightMap.get(tensor)
        if (name === undefined) return yield* notFound(tensor)
        return yield* open(name)
      })
    const entry = (tensor: string) => Effect.flatMap(fileFor(tensor), (f) => f.entry(tensor))
    return {
      dir,
      names,
      files,
      fileOf: (tensor) => weightMap.get(tensor),
      open,
      entry,
      readTensor: (tensor) => Effect.flatMap(fileFor(tensor), (f) => f.readTensor(tensor)),
      readSlice: (tensor, slice) => Effect.flatMap(fileFor(tensor), (f) => f.readSlice(tensor, slice)),
      opened: Effect.sync(() => [...opened.keys()]),
      bytesRead: Effect.gen(function* () {
        let total = 0
        for (const f of opened.values()) total += yield* f.bytesRead
        return total
      }),
    } satisfies ModelWeights
  })
