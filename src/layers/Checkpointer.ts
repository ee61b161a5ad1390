/**
 * Checkpoints as orbax's CheckpointManager keeps them: a directory per step holding a Zarr v3
 * group, one array per tree leaf chunked by the sharding it was saved from (each distinct device
 * block is one chunk, written once by one replica, with a crc32c), plus manifest.json, written
 * last. The layout is described in src/core/checkpointManifest.ts.
 *
 * Save snapshots the device blocks to host memory (the only part the caller waits for) and writes
 * them in a background fiber with bounded concurrency while training goes on. The write goes to
 * `<step>.tmp-<random>/`, every file and directory is fsynced, and the directory is renamed into
 * place and its parent fsynced: a crash at any instant leaves earlier steps intact and never a
 * step that looks complete but is not. Deleting a step (retention) renames it to a temporary
 * name first, for the same reason.
 *
 * Restore places each array onto any mesh and sharding: every device block is assembled from the
 * chunks that overlap it (and only those), each checked against its crc32c. Names inside a
 * checkpoint are untrusted: they are checked as single safe folder names, symbolic links are
 * refused, and no path can leave the step directory.
 */
import { randomBytes } from "node:crypto"
import { constants } from "node:fs"
import * as fs from "node:fs/promises"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { crc32c } from "@node-rs/crc32"
import { Cause, Context, Deferred, Effect, Exit, Layer, Option, Schema, Semaphore } from "effect"
import { boxArgs } from "../core/backend.ts"
import {
  arrayPath,
  CheckpointManifest,
  checkpointNameProblem,
  isTemporaryName,
  MANIFEST_FILE,
  MANIFEST_FORMAT,
  type SavedArray,
  type SpecJson,
  stepDirectoryName,
  stepOfDirectoryName,
} from "../core/checkpointManifest.ts"
import { type DType, itemSize } from "../core/dtype.ts"
import { attempt, type DeviceError } from "../core/errors.ts"
import type { Mesh } from "../core/mesh.ts"
import type { PartitionRules } from "../core/partitionRules.ts"
import { formatShape, numel } from "../core/shape.ts"
import { allocateArray, isShardedArray, type ShardedArray, slicesByBlock } from "../core/shardedArray.ts"
import type { NamedSharding } from "../core/sharding.ts"
import { flattenWithPath, type IsLeaf, mapWithPath, type Tree } from "../core/tree.ts"
import {
  arrayMetadata,
  type ChunkOverlap,
  chunkKey,
  chunkOfBlock,
  chunksOverlapping,
  contiguousRange,
  encodeMetadata,
  groupMetadata,
  parseArrayMetadata,
  ZARR_JSON,
} from "../core/zarr.ts"
import { hostBuffer } from "../native/hostMemory.ts"
import { Devices } from "./Devices.ts"
import { makeDirectories } from "./makeDirectories.ts"

// ---------------------------------------------------------------------------------------------
// Errors

export class CheckpointWriteFailed extends Schema.TaggedError<CheckpointWriteFailed>()(
  "CheckpointWriteFailed",
  {
    directory: Schema.String,
    step: Schema.Number,
    code: Schema.String,
    detail: Schema.String,
  },
) {
  override get message() {
    const why =
      this.code === "ENOSPC" || this.code === "EDQUOT"
        ? "no space left on the device: free space, lower maxToKeep or choose another --checkpoint-dir"
        : this.code === "EACCES" || this.code === "EPERM" || this.code === "EROFS"
          ? "permission denied: check that the checkpoint directory is writable"
          : `${this.detail} (${this.code})`
    return `could not save step ${this.step} to ${this.directory}: ${why}. Earlier checkpoints are intact.`
  }
}

export class CheckpointNotFound extends Schema.TaggedError<CheckpointNotFound>()("CheckpointNotFound", {
  directory: Schema.String,
  step: Schema.Number,
}) {
  override get message() {
    return `no complete checkpoint for step ${this.step} in ${this.directory}: list the saved steps with allSteps (or latestStep)`
  }
}

export class CheckpointCorrupt extends Schema.TaggedError<CheckpointCorrupt>()("CheckpointCorrupt", {
  directory: Schema.String,
  step: Schema.Number,
  array: Schema.String,
  chunk: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    const where = this.chunk === "" ? this.array : `chunk ${this.chunk} of ${this.array}`
    return `checkpoint step ${this.step} in ${this.directory}: ${where} ${this.detail}; the files are damaged: restore an earlier step`
  }
}

export class CheckpointMismatch extends Schema.TaggedError<CheckpointMismatch>()("CheckpointMismatch", {
  step: Schema.Number,
  array: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `checkpoint step ${this.step}: ${this.array} ${this.detail}; restore with the model, dtype and item names it was saved with`
  }
}

export class UnsafeCheckpointPath extends Schema.TaggedError<UnsafeCheckpointPath>()("UnsafeCheckpointPath", {
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return `refusing checkpoint path "${this.path}": ${this.reason}; rename the tree key (names are letters, digits, '.', '_' and '-', and stay inside the step directory)`
  }
}

export type CheckpointError =
  | CheckpointWriteFailed
  | CheckpointNotFound
  | CheckpointCorrupt
  | CheckpointMismatch
  | UnsafeCheckpointPath

// ---------------------------------------------------------------------------------------------
// Public types

/** What restore needs to know of each array: where it goes. */
export interface ArrayTarget {
  readonly shape: ReadonlyArray<number>
  readonly dtype: DType
  readonly sharding: NamedSharding
}

/** A tree of targets with every target replaced by the array restored for it. */
export type Restored<T> = T extends ArrayTarget
  ? ShardedArray
  : T extends ReadonlyArray<infer U>
    ? ReadonlyArray<Restored<U>>
    : T extends object
      ? { readonly [K in keyof T]: Restored<T[K]> }
      : never

/** What the caller stores next to the arrays (opaque JSON except the rules). */
export interface SaveMetadata {
  readonly rules?: PartitionRules
  readonly dataPosition?: unknown
  readonly rng?: unknown
  readonly modelConfig?: unknown
  readonly extras?: Readonly<Record<string, unknown>>
}

/** The file operations a save makes; tests swap in failing ones (a full disk). */
export interface CheckpointIO {
  /** Creates the file (it must not exist), writes all bytes and fsyncs it. */
  readonly writeFile: (path: string, data: Uint8Array) => Promise<void>
  /** Creates a directory and any missing parents. */
  readonly mkdir: (path: string) => Promise<void>
  readonly fsyncDir: (path: string) => Promise<void>
  readonly rename: (from: string, to: string) => Promise<void>
  /** Removes a directory tree (links are removed, never followed). */
  readonly remove: (path: string) => Promise<void>
}

export const nodeIO: CheckpointIO = {
  writeFile: async (path, data) => {
    const h = await fs.open(path, "wx")
    try {
      let off = 0
      while (off < data.byteLength) off += (await h.write(data, off, data.byteLength - off, off)).bytesWritten
      await h.sync()
    } finally {
      await h.close()
    }
  },
  mkdir: async (path) => {
    await makeDirectories(path)
  },
  fsyncDir: async (path) => {
    const h = await fs.open(path, "r")
    try {
      await h.sync()
    } finally {
      await h.close()
    }
  },
  rename: (from, to) => fs.rename(from, to),
  remove: (path) => fs.rm(path, { recursive: true, force: true }),
}

export interface CheckpointerOptions {
  readonly directory: string
  /** Save every this many steps (orbax's save_interval_steps); 1 by default. */
  readonly saveInterval?: number
  /** Keep at most this many complete steps, deleting the oldest after each successful save; all by default. */
  readonly maxToKeep?: number
  /** Files written at once by a save, and chunks read at once by a restore; 8 by default. */
  readonly maxConcurrentWrites?: number
  /**
   * Arrays a restore reads at once (each with up to maxConcurrentWrites chunks in flight); 16 by
   * default (with UV_THREADPOOL_SIZE=16, as bin/magix.js sets: 83% of dd on the H200 host, 4 gave 69%).
   */
  readonly maxConcurrentArrays?: number
  /**
   * Keep the host memory of the last snapshot for the next one (true by default): saves after the
   * first copy into memory already touched, at the cost of holding one snapshot between saves.
   */
  readonly reuseSnapshotMemory?: boolean
  /** The file system a save writes through (a seam for tests); node:fs by default. */
  readonly io?: CheckpointIO
}

export interface CheckpointStats {
  /** The last save: chunk and metadata bytes written, chunks written. */
  readonly bytesWritten: number
  readonly chunksWritten: number
  /** How long the last save held the caller (the snapshot to host memory). */
  readonly snapshotMs: number
  /** How long the last background write took, rename and fsyncs included. */
  readonly writeMs: number
  /** The last restore: chunk bytes and chunks each mesh position needed (the chunks overlapping its slices). */
  readonly restoreBytesPerPosition: ReadonlyArray<number>
  readonly restoreChunksPerPosition: ReadonlyArray<number>
  /** The last restore: bytes actually read from disk (a chunk several blocks need is read once per array). */
  readonly restoreBytesRead: number
  readonly restoreMs: number
}

// ---------------------------------------------------------------------------------------------
// The service

export class Checkpointer extends Context.Service<
  Checkpointer,
  {
    readonly directory: string
    /**
     * Whether `step` is one to save: a multiple of saveInterval, or `force` (the last step); never
     * a step at or before the last one saved (orbax's rule).
     */
    readonly shouldSave: (step: number, force?: boolean) => boolean
    /**
     * Snapshots the arrays to host memory now (waiting first for a save still in flight) and
     * writes them in the background. A failure of the write surfaces in `wait` or the next save.
     */
    readonly save: (
      step: number,
      items: Readonly<Record<string, Tree<ShardedArray>>>,
      metadata?: SaveMetadata,
    ) => Effect.Effect<void, CheckpointWriteFailed | UnsafeCheckpointPath>
    /** Waits for the save in flight, if any, failing with its error (reported once). */
    readonly wait: Effect.Effect<void, CheckpointWriteFailed>
    /** The step being written in the background, if any. */
    readonly pendingStep: Effect.Effect<Option.Option<number>>
    /** The newest complete step. */
    readonly latestStep: Effect.Effect<Option.Option<number>>
    /** Every complete step, oldest first. */
    readonly allSteps: Effect.Effect<ReadonlyArray<number>>
    readonly readManifest: (
      step: number,
    ) => Effect.Effect<CheckpointManifest, CheckpointNotFound | CheckpointCorrupt>
    /**
     * The arrays of `items` (all or some of the items saved) placed as each target says: any mesh,
     * any sharding. Each device block is assembled from the chunks overlapping it.
     */
    readonly restore: <const T extends Readonly<Record<string, Tree<ArrayTarget>>>>(
      step: number,
      items: T,
    ) => Effect.Effect<{ readonly [K in keyof T]: Restored<T[K]> }, CheckpointError | DeviceError>
    readonly stats: Effect.Effect<CheckpointStats>
  }
>()("magix/Checkpointer") {
  static readonly layer = (options: CheckpointerOptions): Layer.Layer<Checkpointer, never, Devices> =>
    Layer.effect(Checkpointer, make(options))
}

// ---------------------------------------------------------------------------------------------
// Internals

const isArrayTarget: IsLeaf<ArrayTarget> = (x): x is ArrayTarget =>
  typeof x === "object" &&
  x !== null &&
  Array.isArray((x as ArrayTarget).shape) &&
  "sharding" in x &&
  "dtype" in x

/** One array's distinct blocks copied off the devices: what the background write needs. */
interface Snapshot {
  readonly item: string
  /** The leaf's tree path ("" where the item is the array). */
  readonly leaf: string
  readonly saved: SavedArray
  readonly chunkShape: ReadonlyArray<number>
  /** Chunk key and encoded bytes (data, then its crc32c, little-endian). */
  readonly chunks: ReadonlyArray<{ readonly key: string; readonly bytes: Uint8Array }>
}

const errorCode = (e: unknown): string =>
  typeof e === "object" && e !== null && typeof (e as { code?: unknown }).code === "string"
    ? (e as { code: string }).code
    : "EIO"

const errorText = (e: unknown): string => (e instanceof Error ? e.message : String(e))

const utf8 = new TextEncoder()
const jsonBytes = (x: unknown) => utf8.encode(`${JSON.stringify(x, null, 2)}\n`)

const randomSuffix = () => randomBytes(6).toString("hex")

/** Checks an item name and a leaf path (each one folder). */
const checkNames = (item: string, leaf: string) => {
  for (const name of leaf === "" ? [item] : [item, leaf]) {
    const problem = checkpointNameProblem(name)
    if (problem)
      return Effect.fail(new UnsafeCheckpointPath({ path: arrayPath(item, leaf), reason: problem }))
  }
  return Effect.void
}

/**
 * Reads a whole regular file inside a checkpoint, refusing a symbolic link in its place; into
 * `scratch` where it fits (reused memory: first touches of fresh pages cost more than the copy).
 */
const readRegularFile = async (path: string, maxBytes: number, scratch?: Uint8Array): Promise<Uint8Array> => {
  const h = await fs.open(path, constants.O_RDONLY | constants.O_NOFOLLOW)
  try {
    const st = await h.stat()
    if (!st.isFile()) throw Object.assign(new Error("not a regular file"), { code: "ENOTFILE" })
    if (st.size > maxBytes) throw Object.assign(new Error(`${st.size} bytes`), { code: "ETOOBIG" })
    const out =
      scratch && scratch.byteLength >= st.size ? scratch.subarray(0, st.size) : new Uint8Array(st.size)
    let off = 0
    while (off < out.byteLength) {
      const { bytesRead } = await h.read(out, off, out.byteLength - off, off)
      if (bytesRead === 0) break
      off += bytesRead
    }
    return off === out.byteLength ? out : out.subarray(0, off)
  } finally {
    await h.close()
  }
}

/** Metadata documents are small; anything larger than this is not one of ours. */
const MAX_JSON_BYTES = 64 << 20

const libraryVersion = Effect.promise(() =>
  fs
    .readFile(fileURLToPath(new URL("../../package.json", import.meta.url)), "utf8")
    .then((t) => `magix-ts ${(JSON.parse(t) as { version?: string }).version ?? "unknown"}`)
    .catch(() => "magix-ts"),
)

const make = (options: CheckpointerOptions) =>
  Effect.gen(function* () {
    const devices = yield* Devices
    const root = options.directory
    const io = options.io ?? nodeIO
    const interval = Math.max(1, Math.floor(options.saveInterval ?? 1))
    const concurrency = Math.max(1, Math.floor(options.maxConcurrentWrites ?? 8))
    const arrayConcurrency = Math.max(1, Math.floor(options.maxConcurrentArrays ?? 16))
    const library = yield* libraryVersion

    let pending:
      | { readonly step: number; readonly done: Deferred.Deferred<void, CheckpointWriteFailed> }
      | undefined
    let stats: CheckpointStats = {
      bytesWritten: 0,
      chunksWritten: 0,
      snapshotMs: 0,
      writeMs: 0,
      restoreBytesPerPosition: [],
      restoreChunksPerPosition: [],
      restoreBytesRead: 0,
      restoreMs: 0,
    }

    // Leftovers of a save or deletion that never finished are not checkpoints: remove them.
    yield* Effect.promise(async () => {
      const names = await fs.readdir(root).catch(() => [] as string[])
      await Promise.all(
        names.filter(isTemporaryName).map((n) => io.remove(join(root, n)).catch(() => undefined)),
      )
    })

    /** Whether `<root>/<name>` is a complete step: a real directory with a valid manifest for it. */
    const isComplete = async (name: string, step: number) => {
      const st = await fs.lstat(join(root, name)).catch(() => undefined)
      if (!st?.isDirectory()) return false
      const text = await readRegularFile(join(root, name, MANIFEST_FILE), MAX_JSON_BYTES).catch(
        () => undefined,
      )
      if (!text) return false
      try {
        const m = JSON.parse(Buffer.from(text).toString("utf8")) as unknown
        return Schema.is(CheckpointManifest)(m) && m.step === step
      } catch {
        return false
      }
    }

    const completeSteps = Effect.promise(async () => {
      const names = await fs.readdir(root).catch(() => [] as string[])
      const steps: number[] = []
      for (const n of names) {
        const step = stepOfDirectoryName(n)
        if (step !== undefined && (await isComplete(n, step))) steps.push(step)
      }
      return steps.sort((a, b) => a - b)
    })

    // orbax's should_save never re-saves a step at or before the newest one.
    let lastSaved = (yield* completeSteps).at(-1)

    const wait: Effect.Effect<void, CheckpointWriteFailed> = Effect.suspend(() => {
      const p = pending
      if (!p) return Effect.void
      // The failure is reported once: whoever sees it clears it, and later saves start afresh.
      // A waiter that is interrupted (Ctrl-C) has not seen the outcome: the write stays pending,
      // so the layer's finalizer still waits for it before the process exits.
      return Deferred.await(p.done).pipe(
        Effect.onExit((exit) =>
          Effect.sync(() => {
            if ((Exit.isSuccess(exit) || Exit.hasFails(exit)) && pending === p) pending = undefined
          }),
        ),
      )
    })

    // -------------------------------------------------------------------------------------------
    // Save

    const snapshot = (items: Readonly<Record<string, Tree<ShardedArray>>>) =>
      Effect.gen(function* () {
        const snaps: Snapshot[] = []
        const seen = new Set<string>()
        let mesh: Mesh | undefined
        for (const [item, tree] of Object.entries(items)) {
          for (const [leaf, arr] of flattenWithPath(tree, isShardedArray)) {
            yield* checkNames(item, leaf)
            const path = arrayPath(item, leaf)
            if (seen.has(path))
              return yield* new UnsafeCheckpointPath({
                path,
                reason: "two leaves of the tree have this path (keys with '.' collide with nesting)",
              })
            seen.add(path)
            if (arr.partial.length > 0)
              return yield* Effect.die(
                new Error(`checkpoint of ${path}: the array is still partial over ${arr.partial}`),
              )
            mesh ??= arr.mesh
            const chunkShape = arr.localShape
            const esize = itemSize(arr.dtype)
            const bytes = numel(chunkShape) * esize
            const chunks: Array<{ key: string; bytes: Uint8Array }> = []
            if (bytes > 0)
              for (const { slice, positions } of slicesByBlock(arr.sharding, arr.shape)) {
                // Each distinct block once, from the first device holding it, plus 4 bytes of crc32c.
                const coords = chunkOfBlock(arr.shape, chunkShape, slice)!
                const data = takeSpare(bytes + 4)
                devices.backend.read(arr.buffer(positions[0]!), 0, bytes, data.subarray(0, bytes))
                new DataView(data.buffer, data.byteOffset).setUint32(
                  bytes,
                  crc32c(data.subarray(0, bytes)),
                  true,
                )
                chunks.push({ key: chunkKey(coords), bytes: data })
              }
            snaps.push({
              item,
              leaf,
              chunkShape,
              saved: {
                path,
                shape: [...arr.shape],
                dtype: arr.dtype,
                spec: arr.spec.padTo(arr.rank).toJSON() as SpecJson,
                chunkShape: [...chunkShape],
              },
              chunks,
            })
          }
        }
        return { snaps, mesh }
      })

    // Host memory of the last snapshot, handed to the next one: on a VM, the page faults of
    // touching fresh memory cost several times the copy from the device (see the throughput test).
    let spare = new Map<number, Uint8Array[]>()
    const takeSpare = (size: number) =>
      spare.get(size)?.pop() ?? hostBuffer(size, devices.platform === "cuda")
    const keepSpare = (snaps: ReadonlyArray<Snapshot>) => {
      if (!(options.reuseSnapshotMemory ?? true)) return
      const next = new Map<number, Uint8Array[]>()
      for (const s of snaps)
        for (const c of s.chunks) {
          const list = next.get(c.bytes.byteLength)
          if (list) list.push(c.bytes)
          else next.set(c.bytes.byteLength, [c.bytes])
        }
      // Buffers the last snapshot did not take are let go.
      spare = next
    }

    /** Renames a step out of the way and removes it: a crash in between leaves only a temporary name. */
    const discard = (name: string) =>
      Effect.promise(async () => {
        const aside = join(root, `${name}.tmp-del-${randomSuffix()}`)
        await io.rename(join(root, name), aside)
        await io.fsyncDir(root)
        await io.remove(aside)
      })

    const write = (step: number, snaps: ReadonlyArray<Snapshot>, manifest: CheckpointManifest) =>
      Effect.gen(function* () {
        const t0 = performance.now()
        const name = stepDirectoryName(step)
        const tmp = join(root, `${name}.tmp-${randomSuffix()}`)
        const final = join(root, name)
        const run = <A>(f: () => Promise<A>) =>
          Effect.tryPromise({
            try: f,
            catch: (e) =>
              new CheckpointWriteFailed({ directory: root, step, code: errorCode(e), detail: errorText(e) }),
          })
        const files: Array<{ path: string; data: Uint8Array }> = []
        const dirs = new Set<string>([tmp])
        files.push({ path: join(tmp, ZARR_JSON), data: utf8.encode(encodeMetadata(groupMetadata({ step }))) })
        let bytes = 0
        for (const s of snaps) {
          const dir = s.leaf === "" ? join(tmp, s.item) : join(tmp, s.item, s.leaf)
          if (s.leaf !== "" && !dirs.has(join(tmp, s.item))) {
            dirs.add(join(tmp, s.item))
            files.push({
              path: join(tmp, s.item, ZARR_JSON),
              data: utf8.encode(encodeMetadata(groupMetadata())),
            })
          }
          dirs.add(dir)
          const meta = arrayMetadata(s.saved.shape, s.saved.dtype, s.chunkShape, { spec: s.saved.spec })
          files.push({ path: join(dir, ZARR_JSON), data: utf8.encode(encodeMetadata(meta)) })
          for (const c of s.chunks) {
            const parts = c.key.split("/")
            for (let i = 1; i < parts.length; i++) dirs.add(join(dir, ...parts.slice(0, i)))
            files.push({ path: join(dir, ...parts), data: c.bytes })
          }
        }
        for (const f of files) bytes += f.data.byteLength
        const chunkCount = snaps.reduce((n, s) => n + s.chunks.length, 0)
        // Parents before children; fsync children before parents, so each entry is durable before its name.
        const ordered = [...dirs].sort((a, b) => a.length - b.length)
        const body = Effect.gen(function* () {
          for (const d of ordered) yield* run(() => io.mkdir(d))
          yield* Effect.forEach(files, (f) => run(() => io.writeFile(f.path, f.data)), {
            concurrency,
            discard: true,
          })
          yield* Effect.forEach([...ordered].reverse(), (d) => run(() => io.fsyncDir(d)), {
            concurrency,
            discard: true,
          })
          // The manifest last: until it exists, the directory is not a checkpoint (nor is it named like one).
          yield* run(() => io.writeFile(join(tmp, MANIFEST_FILE), jsonBytes(manifest)))
          yield* run(() => io.fsyncDir(tmp))
          // Saving a step again replaces it; the old copy is moved aside, not deleted, until the new one is in place.
          const aside = join(root, `${name}.tmp-old-${randomSuffix()}`)
          const replaced = yield* run(() =>
            io.rename(final, aside).then(
              () => true,
              (e) => {
                if (errorCode(e) === "ENOENT") return false
                throw e
              },
            ),
          )
          yield* run(() => io.rename(tmp, final)).pipe(
            Effect.tapError(() =>
              replaced ? Effect.promise(() => io.rename(aside, final).catch(() => undefined)) : Effect.void,
            ),
          )
          yield* run(() => io.fsyncDir(root))
          // The new step is in place: a failure to remove the old copy only leaves a temporary folder.
          if (replaced) yield* Effect.promise(() => io.remove(aside).catch(() => undefined))
        })
        yield* body.pipe(Effect.onError(() => Effect.promise(() => io.remove(tmp).catch(() => undefined))))
        stats = { ...stats, bytesWritten: bytes, chunksWritten: chunkCount, writeMs: performance.now() - t0 }
        if (options.maxToKeep !== undefined) {
          const steps = yield* completeSteps
          const drop = steps.slice(0, Math.max(0, steps.length - Math.max(1, options.maxToKeep)))
          for (const s of drop)
            yield* discard(stepDirectoryName(s)).pipe(
              Effect.catchCause(() =>
                Effect.logWarning(`checkpoint retention: could not delete step ${s} in ${root}`),
              ),
            )
        }
      })

    // Saves from several fibers queue here: one snapshot, then one write in flight, at a time.
    const saving = Semaphore.makeUnsafe(1)

    const save = (
      step: number,
      items: Readonly<Record<string, Tree<ShardedArray>>>,
      metadata: SaveMetadata = {},
    ) =>
      Effect.gen(function* () {
        if (!Number.isSafeInteger(step) || step < 0)
          return yield* Effect.die(new Error(`checkpoint step must be a non-negative integer, got ${step}`))
        for (const item of Object.keys(items)) yield* checkNames(item, "")
        // A second save waits for the first; its failure, if any, is this save's failure.
        yield* wait
        const t0 = performance.now()
        const { snaps, mesh } = yield* snapshot(items)
        const snapshotMs = performance.now() - t0
        stats = { ...stats, snapshotMs }
        const manifest: CheckpointManifest = {
          format: MANIFEST_FORMAT,
          step,
          library,
          createdAt: new Date().toISOString(),
          mesh: { shape: [...(mesh?.shape ?? [])], axisNames: [...(mesh?.axisNames ?? [])] },
          rules: (metadata.rules ?? []).map(([p, s]) => [
            typeof p === "string" ? p : p.source,
            s.toJSON() as SpecJson,
          ]),
          items: Object.keys(items),
          arrays: snaps.map((s) => s.saved),
          ...(metadata.dataPosition !== undefined ? { dataPosition: metadata.dataPosition } : {}),
          ...(metadata.rng !== undefined ? { rng: metadata.rng } : {}),
          ...(metadata.modelConfig !== undefined ? { modelConfig: metadata.modelConfig } : {}),
          ...(metadata.extras ? { extras: metadata.extras } : {}),
        }
        const done = yield* Deferred.make<void, CheckpointWriteFailed>()
        pending = { step, done }
        lastSaved = Math.max(lastSaved ?? step, step)
        // Detached: the write outlives the caller's fiber; the layer's finalizer waits for it.
        yield* Effect.forkDetach(
          write(step, snaps, manifest).pipe(
            Effect.ensuring(Effect.sync(() => keepSpare(snaps))),
            Effect.onExit((exit) =>
              Deferred.done(
                done,
                Exit.isSuccess(exit) || Exit.hasFails(exit)
                  ? exit
                  : Exit.fail(
                      Exit.hasInterrupts(exit)
                        ? new CheckpointWriteFailed({
                            directory: root,
                            step,
                            code: "EINTR",
                            detail: "the save was interrupted",
                          })
                        : new CheckpointWriteFailed({
                            directory: root,
                            step,
                            code: "EIO",
                            detail: Cause.pretty(exit.cause),
                          }),
                    ),
              ),
            ),
          ),
        )
      }).pipe(Semaphore.withPermit(saving))

    // -------------------------------------------------------------------------------------------
    // Manifest and restore

    const readManifest = (step: number) =>
      Effect.gen(function* () {
        const name = stepDirectoryName(step)
        const notFound = new CheckpointNotFound({ directory: root, step })
        if (!Number.isSafeInteger(step) || step < 0) return yield* notFound
        const corrupt = (detail: string) =>
          new CheckpointCorrupt({ directory: root, step, array: MANIFEST_FILE, chunk: "", detail })
        const st = yield* Effect.promise(() => fs.lstat(join(root, name)).catch(() => undefined))
        if (!st?.isDirectory()) return yield* notFound
        const bytes = yield* Effect.tryPromise({
          try: () => readRegularFile(join(root, name, MANIFEST_FILE), MAX_JSON_BYTES),
          catch: () => notFound,
        })
        const json = yield* Effect.try({
          try: () => JSON.parse(Buffer.from(bytes).toString("utf8")) as unknown,
          catch: () => corrupt("is not valid JSON"),
        })
        const manifest = yield* Schema.decodeUnknownEffect(CheckpointManifest)(json).pipe(
          Effect.mapError((e) => corrupt(`is not a manifest: ${e.message}`)),
        )
        if (manifest.step !== step) return yield* corrupt(`is the manifest of step ${manifest.step}`)
        for (const a of manifest.arrays) {
          const bad = a.path.split("/").some((part) => checkpointNameProblem(part) !== undefined)
          if (bad || a.path.split("/").length > 2)
            return yield* corrupt(`lists an unsafe array path "${a.path}"`)
        }
        return manifest
      })

    interface Tally {
      readonly bytes: number[]
      readonly chunks: number[]
      read: number
      readonly scratch: Map<number, Uint8Array[]>
    }

    const restoreArray = (
      step: number,
      stepDir: string,
      realStepDir: string,
      manifest: CheckpointManifest,
      item: string,
      leaf: string,
      target: ArrayTarget,
      tally: Tally,
    ) =>
      Effect.gen(function* () {
        yield* checkNames(item, leaf)
        const name = arrayPath(item, leaf)
        const mismatch = (detail: string) => new CheckpointMismatch({ step, array: name, detail })
        const corrupt = (chunk: string, detail: string) =>
          new CheckpointCorrupt({ directory: root, step, array: name, chunk, detail })
        const saved = manifest.arrays.find((a) => a.path === name)
        if (!saved) {
          const near = manifest.arrays.filter((a) => a.path.startsWith(`${item}/`)).length
          return yield* mismatch(
            `is not in the checkpoint (it holds ${manifest.arrays.length} arrays, ${near} under "${item}"; items: ${manifest.items.join(", ")})`,
          )
        }
        const wanted = `${target.dtype} ${formatShape(target.shape)}`
        const have = `${saved.dtype} ${formatShape(saved.shape)}`
        if (wanted !== have) return yield* mismatch(`is ${have} in the checkpoint but ${wanted} is wanted`)
        yield* target.sharding
          .validate(target.shape, name)
          .pipe(Effect.mapError((e) => mismatch(`cannot take the requested sharding: ${e.message}`)))

        // No link anywhere below the step directory: the array folder must be exactly where its name says.
        const dir = leaf === "" ? join(stepDir, item) : join(stepDir, item, leaf)
        const expected = leaf === "" ? join(realStepDir, item) : join(realStepDir, item, leaf)
        const real = yield* Effect.promise(() => fs.realpath(dir).catch(() => undefined))
        if (real === undefined)
          return yield* corrupt("", "is listed in the manifest but its folder is missing")
        if (real !== expected)
          return yield* corrupt("", "is a symbolic link (refused: it could leave the step directory)")
        const metaBytes = yield* Effect.tryPromise({
          try: () => readRegularFile(join(dir, ZARR_JSON), MAX_JSON_BYTES),
          catch: (e) => corrupt(ZARR_JSON, `cannot be read (${errorCode(e)})`),
        })
        const metaJson = yield* Effect.try({
          try: () => JSON.parse(Buffer.from(metaBytes).toString("utf8")) as unknown,
          catch: () => corrupt(ZARR_JSON, "is not valid JSON"),
        })
        const meta = yield* parseArrayMetadata(metaJson, join(dir, ZARR_JSON)).pipe(
          Effect.mapError((e) => corrupt(ZARR_JSON, e.message)),
        )
        if (`${meta.dtype} ${formatShape(meta.shape)}` !== have)
          return yield* corrupt(
            ZARR_JSON,
            `says ${meta.dtype} ${formatShape(meta.shape)} but the manifest ${have}`,
          )

        const esize = itemSize(meta.dtype)
        const chunkBytes = numel(meta.chunkShape) * esize
        const encodedBytes = chunkBytes + (meta.checksum ? 4 : 0)
        const blocks = slicesByBlock(target.sharding, target.shape)
        const overlapsOf = blocks.map(({ slice }) => chunksOverlapping(meta.shape, meta.chunkShape, slice))
        // Which chunks each distinct block needs; a chunk needed by several blocks is read once.
        const needs = new Map<string, Array<{ block: number; overlap: ChunkOverlap }>>()
        blocks.forEach(({ positions }, block) => {
          const overlaps = overlapsOf[block]!
          for (const p of positions) {
            tally.chunks[p]! += overlaps.length
            tally.bytes[p]! += overlaps.length * encodedBytes
          }
          for (const overlap of overlaps) {
            const list = needs.get(overlap.key)
            if (list) list.push({ block, overlap })
            else needs.set(overlap.key, [{ block, overlap }])
          }
        })
        // A block whose every piece is one contiguous run in its chunk and in the block (the same
        // sharding, or whole rows) is written to the devices piece by piece; any other is
        // assembled on the host first.
        const direct = blocks.map(({ slice }, block) =>
          overlapsOf[block]!.every(
            (o) =>
              contiguousRange(meta.chunkShape, { offsets: o.inChunk, shape: o.box.shape }) !== undefined &&
              contiguousRange(slice.shape, { offsets: o.inBlock, shape: o.box.shape }) !== undefined,
          ),
        )
        // Chunk and staging buffers are reused across chunks (and arrays) of one restore.
        const pool = (size: number) => {
          const list = tally.scratch.get(size) ?? []
          tally.scratch.set(size, list)
          return list
        }
        const chunkBuffers = pool(encodedBytes)
        const staging = new Map<number, Uint8Array>()
        const stage = (block: number) => {
          let host = staging.get(block)
          if (!host) {
            const size = numel(blocks[block]!.slice.shape) * esize
            host = pool(size).pop() ?? hostBuffer(size, false)
            staging.set(block, host)
          }
          return host
        }
        const out = yield* attempt(() =>
          allocateArray(devices.engine, target.shape, target.dtype, target.sharding),
        )
        return yield* Effect.gen(function* () {
          yield* Effect.forEach(
            [...needs],
            ([key, uses]) =>
              Effect.gen(function* () {
                const buffer = chunkBuffers.pop() ?? hostBuffer(encodedBytes, false)
                const data = yield* Effect.tryPromise({
                  try: () => readRegularFile(join(dir, ...key.split("/")), encodedBytes, buffer),
                  catch: (e) => {
                    const code = errorCode(e)
                    return corrupt(
                      key,
                      code === "ENOENT"
                        ? "is missing"
                        : code === "ETOOBIG"
                          ? `is larger than the ${encodedBytes} bytes expected`
                          : code === "ELOOP" || code === "ENOTFILE"
                            ? "is not a regular file (links are refused)"
                            : `cannot be read (${code})`,
                    )
                  },
                })
                tally.read += data.byteLength
                if (data.byteLength !== encodedBytes)
                  return yield* corrupt(key, `holds ${data.byteLength} bytes, ${encodedBytes} expected`)
                const body = data.subarray(0, chunkBytes)
                if (meta.checksum) {
                  const stored = new DataView(data.buffer, data.byteOffset + chunkBytes, 4).getUint32(0, true)
                  if (crc32c(body) !== stored) return yield* corrupt(key, "fails its crc32c check")
                }
                for (const { block, overlap } of uses) {
                  const { slice, positions } = blocks[block]!
                  if (direct[block]) {
                    const from = contiguousRange(meta.chunkShape, {
                      offsets: overlap.inChunk,
                      shape: overlap.box.shape,
                    })!
                    const to = contiguousRange(slice.shape, {
                      offsets: overlap.inBlock,
                      shape: overlap.box.shape,
                    })!
                    const piece = body.subarray(from.start * esize, (from.start + from.length) * esize)
                    for (const p of positions) devices.backend.write(out.buffer(p), to.start * esize, piece)
                  } else
                    devices.backend.hostCopyBox(
                      body,
                      stage(block),
                      esize,
                      boxArgs(
                        meta.chunkShape,
                        overlap.inChunk,
                        slice.shape,
                        overlap.inBlock,
                        overlap.box.shape,
                      ),
                    )
                }
                chunkBuffers.push(buffer)
              }),
            { concurrency, discard: true },
          )
          for (const [block, host] of staging) {
            for (const p of blocks[block]!.positions) devices.backend.write(out.buffer(p), 0, host)
            pool(host.byteLength).push(host)
          }
          return out
        }).pipe(Effect.onError(() => Effect.sync(() => out.dispose())))
      })

    const restore = <const T extends Readonly<Record<string, Tree<ArrayTarget>>>>(step: number, items: T) =>
      Effect.gen(function* () {
        const t0 = performance.now()
        const manifest = yield* readManifest(step)
        const stepDir = join(root, stepDirectoryName(step))
        const realStepDir = yield* Effect.tryPromise({
          try: () => fs.realpath(stepDir),
          catch: () => new CheckpointNotFound({ directory: root, step }),
        })
        const targets = Object.entries(items).map(([item, tree]) => ({
          item,
          tree,
          leaves: flattenWithPath(tree, isArrayTarget),
        }))
        const size = Math.max(0, ...targets.flatMap((t) => t.leaves.map(([, a]) => a.sharding.mesh.size)))
        const tally: Tally = {
          bytes: new Array<number>(size).fill(0),
          chunks: new Array<number>(size).fill(0),
          read: 0,
          scratch: new Map(),
        }
        const made: ShardedArray[] = []
        const out: Record<string, unknown> = {}
        yield* Effect.gen(function* () {
          for (const { item, tree, leaves } of targets) {
            const restored = new Map<string, ShardedArray>()
            // Several arrays at once: one array's reads overlap another's checksum and copy to the
            // device (one array at a time left the disk idle for half a 1B-model restore on H200).
            yield* Effect.forEach(
              leaves,
              ([leaf, target]) =>
                restoreArray(step, stepDir, realStepDir, manifest, item, leaf, target, tally).pipe(
                  Effect.tap((a) =>
                    Effect.sync(() => {
                      made.push(a)
                      restored.set(leaf, a)
                    }),
                  ),
                ),
              { concurrency: arrayConcurrency, discard: true },
            )
            out[item] = mapWithPath(tree, isArrayTarget, (leaf) => restored.get(leaf)!)
          }
        }).pipe(
          Effect.onExit((exit) =>
            Exit.isSuccess(exit) ? Effect.void : Effect.sync(() => made.forEach((a) => a.dispose())),
          ),
        )
        stats = {
          ...stats,
          restoreBytesPerPosition: tally.bytes,
          restoreChunksPerPosition: tally.chunks,
          restoreBytesRead: tally.read,
          restoreMs: performance.now() - t0,
        }
        return out as { readonly [K in keyof T]: Restored<T[K]> }
      })

    // A save in flight completes before the program's scope closes (also on interruption): its
    // error, if nobody waited for it, is logged.
    yield* Effect.addFinalizer(() => wait.pipe(Effect.catch((e) => Effect.logError(e.message))))

    return Checkpointer.of({
      directory: root,
      shouldSave: (step, force = false) =>
        (lastSaved === undefined || step > lastSaved) && (force || step % interval === 0),
      save,
      wait,
      pendingStep: Effect.sync(() => Option.fromNullishOr(pending?.step)),
      latestStep: Effect.map(completeSteps, (s) => Option.fromNullishOr(s.at(-1))),
      allSteps: completeSteps,
      readManifest,
      restore,
      stats: Effect.sync(() => stats),
    })
  })
