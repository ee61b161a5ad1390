/**
 * Checkpoints as orbax's CheckpointManager keeps them: a directory per step holding a Zarr v3
 * group, one array per tree leaf chunked by the sharding it was saved from (each distinct device
 * block is one chunk, with a crc32c), plus manifest.json, written last.
 *
 * Save snapshots the device blocks to host memory (the only part the caller waits for) and writes
 * them in a background fiber with bounded concurrency while training goes on. The write goes to
 * `<step>.tmp-<random>/`, every file and directory is fsynced, and the directory is renamed into
 * place and its parent fsynced: a crash at any instant leaves earlier steps intact and never a
 * step that looks complete but is not.
 *
 * Restore places each array onto any mesh and sharding: every device block is assembled from the
 * chunks that overlap it (and only those), each checked against its crc32c.
 */
import { randomBytes } from "node:crypto"
import * as fs from "node:fs/promises"
import { join } from "node:path"
import { crc32c } from "@node-rs/crc32"
import { Context, Deferred, Effect, Layer, Option, Schema, type Scope } from "effect"
import { boxArgs } from "../core/backend.ts"
import { CheckpointManifest, MANIFEST_FILE, type SavedArray } from "../core/checkpointManifest.ts"
import { type DType, itemSize } from "../core/dtype.ts"
import type { PartitionRules } from "../core/partitionRules.ts"
import { numel } from "../core/shape.ts"
import { allocateArray, isShardedArray, type ShardedArray, slicesByBlock } from "../core/shardedArray.ts"
import type { NamedSharding } from "../core/sharding.ts"
import { flattenWithPath, type IsLeaf, mapWithPath, type Tree } from "../core/tree.ts"
import {
  arrayMetadata,
  chunkKey,
  chunksOverlapping,
  groupMetadata,
  parseArrayMetadata,
} from "../core/zarr.ts"
import { Devices } from "./Devices.ts"

const LIBRARY = "magix-ts 0.1.0"

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
      this.code === "ENOSPC"
        ? "no space left on the device: free space or choose another --checkpoint-dir"
        : this.code === "EACCES" || this.code === "EPERM"
          ? "permission denied: check that the checkpoint directory is writable"
          : this.detail
    return `could not save step ${this.step} to ${this.directory}: ${why}. Earlier checkpoints are intact.`
  }
}

export class CheckpointNotFound extends Schema.TaggedError<CheckpointNotFound>()("CheckpointNotFound", {
  directory: Schema.String,
  step: Schema.Number,
}) {
  override get message() {
    return `no complete checkpoint for step ${this.step} in ${this.directory}`
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
    return `checkpoint step ${this.step} in ${this.directory}: chunk ${this.chunk} of ${this.array} ${this.detail}; the file is damaged: restore an earlier step`
  }
}

export class CheckpointMismatch extends Schema.TaggedError<CheckpointMismatch>()("CheckpointMismatch", {
  step: Schema.Number,
  array: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `checkpoint step ${this.step}: ${this.array} ${this.detail}; it was saved from a different model or configuration`
  }
}

export class UnsafeCheckpointPath extends Schema.TaggedError<UnsafeCheckpointPath>()("UnsafeCheckpointPath", {
  path: Schema.String,
}) {
  override get message() {
    return `refusing checkpoint path "${this.path}": names are letters, digits, '.', '_' and '-' only, and may not leave the step directory`
  }
}

export type CheckpointError =
  | CheckpointWriteFailed
  | CheckpointNotFound
  | CheckpointCorrupt
  | CheckpointMismatch
  | UnsafeCheckpointPath

/** What restore needs to know of each array: where it goes. */
export interface ArrayTarget {
  readonly shape: ReadonlyArray<number>
  readonly dtype: DType
  readonly sharding: NamedSharding
}

/** What the caller stores next to the arrays. */
export interface SaveMetadata {
  readonly rules?: PartitionRules
  readonly dataPosition?: unknown
  readonly rng?: unknown
  readonly modelConfig?: unknown
  readonly extras?: Readonly<Record<string, unknown>>
}

/** The file operations a save makes; tests swap in failing ones (a full disk). */
export interface CheckpointIO {
  /** Creates the file, writes all bytes and fsyncs it. */
  readonly writeFile: (path: string, data: Uint8Array) => Promise<void>
  readonly mkdir: (path: string) => Promise<void>
  readonly fsyncDir: (path: string) => Promise<void>
  readonly rename: (from: string, to: string) => Promise<void>
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
    await fs.mkdir(path, { recursive: true })
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
}

export interface CheckpointerOptions {
  readonly directory: string
  /** Save every this many steps (orbax's save_interval_steps); 1 by default. */
  readonly saveInterval?: number
  /** Keep at most this many complete steps, deleting the oldest; all by default. */
  readonly maxToKeep?: number
  /** Files written at once. */
  readonly maxConcurrentWrites?: number
  readonly io?: CheckpointIO
}

export interface CheckpointStats {
  readonly bytesWritten: number
  readonly snapshotMs: number
  readonly writeMs: number
  /** Chunk bytes read per mesh position by the last restore. */
  readonly restoreBytesPerPosition: ReadonlyArray<number>
  readonly restoreChunksPerPosition: ReadonlyArray<number>
}

const safeName = /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/
const checkName = (name: string) =>
  safeName.test(name) && name !== "." && name !== ".." && !name.includes("..")
    ? Effect.void
    : Effect.fail(new UnsafeCheckpointPath({ path: name }))

const isArrayTarget: IsLeaf<ArrayTarget> = (x): x is ArrayTarget =>
  typeof x === "object" &&
  x !== null &&
  Array.isArray((x as ArrayTarget).shape) &&
  "sharding" in x &&
  "dtype" in x

const stepName = (step: number) => String(step)

/** One array's blocks copied off the devices: what a background write needs. */
interface Snapshot {
  readonly item: string
  readonly path: string
  readonly array: SavedArray
  readonly chunkShape: ReadonlyArray<number>
  readonly chunks: ReadonlyArray<{ readonly key: string; readonly bytes: Uint8Array }>
}

export class Checkpointer extends Context.Service<
  Checkpointer,
  {
    readonly directory: string
    readonly shouldSave: (step: number, force?: boolean) => boolean
    /** Snapshots now; writes in the background. A failure of the write surfaces in `wait` (or the next save). */
    readonly save: (
      step: number,
      items: Readonly<Record<string, Tree<ShardedArray>>>,
      metadata?: SaveMetadata,
    ) => Effect.Effect<void, CheckpointWriteFailed | UnsafeCheckpointPath>
    /** Waits for the save in flight, if any. */
    readonly wait: Effect.Effect<void, CheckpointWriteFailed>
    readonly latestStep: Effect.Effect<Option.Option<number>>
    readonly allSteps: Effect.Effect<ReadonlyArray<number>>
    readonly readManifest: (
      step: number,
    ) => Effect.Effect<CheckpointManifest, CheckpointNotFound | CheckpointCorrupt>
    readonly restore: <const T extends Readonly<Record<string, Tree<ArrayTarget>>>>(
      step: number,
      items: T,
    ) => Effect.Effect<{ [K in keyof T]: Tree<ShardedArray> }, CheckpointError, Devices>
    readonly stats: Effect.Effect<CheckpointStats>
  }
>()("magix/Checkpointer") {
  static readonly layer = (options: CheckpointerOptions): Layer.Layer<Checkpointer, never, Devices> =>
    Layer.effect(Checkpointer, make(options))
}

const ioError = (directory: string, step: number) => (e: unknown) =>
  new CheckpointWriteFailed({
    directory,
    step,
    code:
      typeof e === "object" && e !== null && typeof (e as { code?: unknown }).code === "string"
        ? (e as { code: string }).code
        : "EIO",
    detail: e instanceof Error ? e.message : String(e),
  })

const make = (
  options: CheckpointerOptions,
): Effect.Effect<Checkpointer["Service"], never, Devices | Scope.Scope> =>
  Effect.gen(function* () {
    const devices = yield* Devices
    const root = options.directory
    const io = options.io ?? nodeIO
    const interval = Math.max(1, options.saveInterval ?? 1)
    const concurrency = Math.max(1, options.maxConcurrentWrites ?? 8)
    let inFlight: Deferred.Deferred<void, CheckpointWriteFailed> | undefined
    let stats: CheckpointStats = {
      bytesWritten: 0,
      snapshotMs: 0,
      writeMs: 0,
      restoreBytesPerPosition: [],
      restoreChunksPerPosition: [],
    }
    const scope = yield* Effect.scope

    // Leftovers of a save that never finished are not checkpoints: remove them.
    yield* Effect.promise(async () => {
      const names = await fs.readdir(root).catch(() => [] as string[])
      await Promise.all(
        names
          .filter((n) => /\.tmp-/.test(n))
          .map((n) => fs.rm(join(root, n), { recursive: true, force: true })),
      )
    })

    const completeSteps = Effect.promise(async () => {
      const names = await fs.readdir(root).catch(() => [] as string[])
      const steps: number[] = []
      for (const n of names) {
        if (!/^\d+$/.test(n)) continue
        const ok = await fs
          .readFile(join(root, n, MANIFEST_FILE), "utf8")
          .then((t) => Schema.is(CheckpointManifest)(JSON.parse(t)))
          .catch(() => false)
        if (ok) steps.push(Number(n))
      }
      return steps.sort((a, b) => a - b)
    })

    const wait = Effect.suspend(() => (inFlight ? Deferred.await(inFlight) : Effect.void))

    const write = (step: number, snaps: ReadonlyArray<Snapshot>, manifest: CheckpointManifest) =>
      Effect.gen(function* () {
        const t0 = performance.now()
        const tmp = join(root, `${stepName(step)}.tmp-${randomBytes(6).toString("hex")}`)
        const final = join(root, stepName(step))
        const run = <A>(f: () => Promise<A>) => Effect.tryPromise({ try: f, catch: ioError(root, step) })
        const body = Effect.gen(function* () {
          yield* run(() => io.mkdir(tmp))
          yield* run(() => io.writeFile(join(tmp, "zarr.json"), jsonBytes(groupMetadata({ step }))))
          const items = [...new Set(snaps.map((s) => s.item))]
          for (const item of items) {
            yield* run(() => io.mkdir(join(tmp, item)))
            yield* run(() => io.writeFile(join(tmp, item, "zarr.json"), jsonBytes(groupMetadata())))
          }
          const dirs = new Set<string>()
          let bytes = 0
          const files: Array<{ path: string; data: Uint8Array }> = []
          for (const s of snaps) {
            const dir = join(tmp, s.item, s.path)
            files.push({
              path: join(dir, "zarr.json"),
              data: jsonBytes(
                arrayMetadata(s.array.shape, s.array.dtype as DType, s.chunkShape, { spec: s.array.spec }),
              ),
            })
            dirs.add(dir)
            for (const c of s.chunks) {
              const path = join(dir, ...c.key.split("/"))
              dirs.add(path.slice(0, path.lastIndexOf("/")))
              files.push({ path, data: c.bytes })
              bytes += c.bytes.byteLength
            }
          }
          for (const d of [...dirs].sort()) yield* run(() => io.mkdir(d))
          yield* Effect.forEach(files, (f) => run(() => io.writeFile(f.path, f.data)), {
            concurrency,
            discard: true,
          })
          for (const d of [...dirs].sort().reverse()) yield* run(() => io.fsyncDir(d))
          for (const item of items) yield* run(() => io.fsyncDir(join(tmp, item)))
          // The manifest last: until it exists, the step is not a checkpoint.
          yield* run(() => io.writeFile(join(tmp, MANIFEST_FILE), jsonBytes(manifest)))
          yield* run(() => io.fsyncDir(tmp))
          yield* run(() => fs.rm(final, { recursive: true, force: true }))
          yield* run(() => io.rename(tmp, final))
          yield* run(() => io.fsyncDir(root))
          stats = { ...stats, bytesWritten: bytes, writeMs: performance.now() - t0 }
          if (options.maxToKeep !== undefined) {
            const steps = yield* completeSteps
            const drop = steps.slice(0, Math.max(0, steps.length - options.maxToKeep))
            for (const s of drop)
              yield* run(() => fs.rm(join(root, stepName(s)), { recursive: true, force: true }))
          }
        })
        yield* body.pipe(
          Effect.onError(() => Effect.promise(() => fs.rm(tmp, { recursive: true, force: true }))),
        )
      })

    const snapshot = (items: Readonly<Record<string, Tree<ShardedArray>>>) =>
      Effect.gen(function* () {
        const snaps: Snapshot[] = []
        for (const [item, tree] of Object.entries(items)) {
          yield* checkName(item)
          for (const [path, arr] of flattenWithPath(tree, isShardedArray)) {
            yield* checkName(path)
            const chunkShape = arr.localShape
            const esize = itemSize(arr.dtype)
            const bytes = numel(chunkShape) * esize
            const chunks = slicesByBlock(arr.sharding, arr.shape).map(({ slice, positions }) => {
              // Each distinct block once, from one of the devices holding it; 4 extra bytes for the crc.
              const data = new Uint8Array(bytes + 4)
              devices.backend.read(arr.buffer(positions[0]!), 0, bytes, data.subarray(0, bytes))
              new DataView(data.buffer).setUint32(bytes, crc32c(data.subarray(0, bytes)), true)
              return { key: chunkKey(slice.offsets.map((o, d) => o / chunkShape[d]!)), bytes: data }
            })
            snaps.push({
              item,
              path,
              chunkShape,
              array: {
                path: `${item}/${path}`,
                shape: [...arr.shape],
                dtype: arr.dtype,
                spec: arr.spec.padTo(arr.rank).toJSON() as SavedArray["spec"],
              },
              chunks,
            })
          }
        }
        return snaps
      })

    const save = (
      step: number,
      items: Readonly<Record<string, Tree<ShardedArray>>>,
      metadata: SaveMetadata = {},
    ) =>
      Effect.gen(function* () {
        yield* wait
        const t0 = performance.now()
        const snaps = yield* snapshot(items)
        stats = { ...stats, snapshotMs: performance.now() - t0 }
        const meshOf = Object.values(items)
          .flatMap((t) => flattenWithPath(t, isShardedArray))
          .map(([, a]) => a.mesh)[0]
        const manifest: CheckpointManifest = {
          format: "magix-checkpoint-1",
          step,
          library: LIBRARY,
          createdAt: new Date().toISOString(),
          mesh: { shape: [...(meshOf?.shape ?? [])], axisNames: [...(meshOf?.axisNames ?? [])] },
          rules: (metadata.rules ?? []).map(([p, s]) => [
            String(typeof p === "string" ? p : p.source),
            s.toJSON() as SavedArray["spec"],
          ]),
          items: Object.keys(items),
          arrays: snaps.map((s) => s.array),
          ...(metadata.dataPosition !== undefined ? { dataPosition: metadata.dataPosition } : {}),
          ...(metadata.rng !== undefined ? { rng: metadata.rng } : {}),
          ...(metadata.modelConfig !== undefined ? { modelConfig: metadata.modelConfig } : {}),
          ...(metadata.extras ? { extras: metadata.extras } : {}),
        }
        const done = yield* Deferred.make<void, CheckpointWriteFailed>()
        inFlight = done
        yield* write(step, snaps, manifest).pipe(
          Effect.exit,
          Effect.flatMap((exit) => Deferred.done(done, exit)),
          Effect.forkIn(scope),
        )
      })

    const readManifest = (step: number) =>
      Effect.gen(function* () {
        const path = join(root, stepName(step), MANIFEST_FILE)
        const text = yield* Effect.tryPromise({
          try: () => fs.readFile(path, "utf8"),
          catch: () => new CheckpointNotFound({ directory: root, step }),
        })
        const json = yield* Effect.try({
          try: () => JSON.parse(text) as unknown,
          catch: () =>
            new CheckpointCorrupt({
              directory: root,
              step,
              array: MANIFEST_FILE,
              chunk: "-",
              detail: "is not valid JSON",
            }),
        })
        return yield* Schema.decodeUnknownEffect(CheckpointManifest)(json).pipe(
          Effect.mapError(
            () =>
              new CheckpointCorrupt({
                directory: root,
                step,
                array: MANIFEST_FILE,
                chunk: "-",
                detail: "is not a manifest",
              }),
          ),
        )
      })

    const restoreArray = (
      step: number,
      item: string,
      path: string,
      target: ArrayTarget,
      perPosition: { bytes: number[]; chunks: number[] },
    ) =>
      Effect.gen(function* () {
        yield* checkName(item)
        yield* checkName(path)
        const name = `${item}/${path}`
        const dir = join(root, stepName(step), item, path)
        const metaText = yield* Effect.tryPromise({
          try: () => fs.readFile(join(dir, "zarr.json"), "utf8"),
          catch: () => new CheckpointMismatch({ step, array: name, detail: "is not in the checkpoint" }),
        })
        const meta = yield* parseArrayMetadata(JSON.parse(metaText), join(dir, "zarr.json")).pipe(
          Effect.mapError(
            (e) =>
              new CheckpointCorrupt({
                directory: root,
                step,
                array: name,
                chunk: "zarr.json",
                detail: e.message,
              }),
          ),
        )
        if (
          meta.dtype !== target.dtype ||
          meta.shape.length !== target.shape.length ||
          meta.shape.some((d, i) => d !== target.shape[i])
        )
          return yield* new CheckpointMismatch({
            step,
            array: name,
            detail: `is ${meta.dtype} [${meta.shape}] in the checkpoint but [${target.shape}] ${target.dtype} is wanted`,
          })
        yield* target.sharding
          .validate(target.shape, name)
          .pipe(Effect.mapError((e) => new CheckpointMismatch({ step, array: name, detail: e.message })))
        const esize = itemSize(meta.dtype)
        const chunkBytes = numel(meta.chunkShape) * esize
        const out = allocateArray(devices.engine, target.shape, target.dtype, target.sharding)
        return yield* Effect.gen(function* () {
          for (const { slice, positions } of slicesByBlock(target.sharding, target.shape)) {
            const block = new Uint8Array(numel(slice.shape) * esize)
            for (const o of chunksOverlapping(meta.shape, meta.chunkShape, slice)) {
              const key = chunkKey(o.coords)
              const data = yield* Effect.tryPromise({
                try: () => fs.readFile(join(dir, ...key.split("/"))),
                catch: () =>
                  new CheckpointCorrupt({
                    directory: root,
                    step,
                    array: name,
                    chunk: key,
                    detail: "is missing",
                  }),
              })
              const expected = chunkBytes + (meta.checksum ? 4 : 0)
              if (data.byteLength !== expected)
                return yield* new CheckpointCorrupt({
                  directory: root,
                  step,
                  array: name,
                  chunk: key,
                  detail: `holds ${data.byteLength} bytes, ${expected} expected`,
                })
              const body = new Uint8Array(data.buffer, data.byteOffset, chunkBytes)
              if (meta.checksum && crc32c(body) !== data.readUInt32LE(chunkBytes))
                return yield* new CheckpointCorrupt({
                  directory: root,
                  step,
                  array: name,
                  chunk: key,
                  detail: "fails its crc32c check",
                })
              for (const p of positions) {
                perPosition.bytes[p]! += data.byteLength
                perPosition.chunks[p]! += 1
              }
              devices.backend.hostCopyBox(
                body,
                block,
                esize,
                boxArgs(
                  o.chunk.shape,
                  o.box.offsets.map((x, d) => x - o.chunk.offsets[d]!),
                  slice.shape,
                  o.box.offsets.map((x, d) => x - slice.offsets[d]!),
                  o.box.shape,
                ),
              )
            }
            for (const p of positions) devices.backend.write(out.buffer(p), 0, block)
          }
          return out
        }).pipe(Effect.onError(() => Effect.sync(() => out.dispose())))
      })

    const restore = <const T extends Readonly<Record<string, Tree<ArrayTarget>>>>(step: number, items: T) =>
      Effect.gen(function* () {
        yield* readManifest(step)
        const firstTarget = Object.values(items)
          .flatMap((t) => flattenWithPath(t, isArrayTarget))
          .map(([, a]) => a)[0]
        const size = firstTarget?.sharding.mesh.size ?? 0
        const perPosition = {
          bytes: new Array<number>(size).fill(0),
          chunks: new Array<number>(size).fill(0),
        }
        const made: ShardedArray[] = []
        const out: Record<string, Tree<ShardedArray>> = {}
        const body = Effect.gen(function* () {
          for (const [item, tree] of Object.entries(items)) {
            const restored = new Map<string, ShardedArray>()
            for (const [path, target] of flattenWithPath(tree, isArrayTarget)) {
              const a = yield* restoreArray(step, item, path, target, perPosition)
              made.push(a)
              restored.set(path, a)
            }
            out[item] = mapWithPath(tree, isArrayTarget, (path) => restored.get(path)!)
          }
        })
        yield* body.pipe(Effect.onError(() => Effect.sync(() => made.forEach((a) => a.dispose()))))
        stats = {
          ...stats,
          restoreBytesPerPosition: perPosition.bytes,
          restoreChunksPerPosition: perPosition.chunks,
        }
        return out as { [K in keyof T]: Tree<ShardedArray> }
      })

    // An in-flight save completes before the program's scope closes (also on interruption).
    yield* Effect.addFinalizer(() => Effect.ignore(wait))

    return Checkpointer.of({
      directory: root,
      shouldSave: (step, force = false) => force || step % interval === 0,
      save,
      wait,
      latestStep: Effect.map(completeSteps, (s) =>
        s.length ? Option.some(s[s.length - 1]!) : Option.none(),
      ),
      allSteps: completeSteps,
      readManifest,
      restore,
      stats: Effect.sync(() => stats),
    })
  })

const jsonBytes = (x: unknown) => new TextEncoder().encode(`${JSON.stringify(x, null, 2)}\n`)
