/**
 * The disk under a directory, for benchmarks that compare against it: free space, file system,
 * raw sequential write and read bandwidth with `dd` (the numbers a checkpoint should approach),
 * and ways to take files out of the page cache so a read measures the disk, not memory.
 */
import { execFileSync } from "node:child_process"
import { statfsSync } from "node:fs"
import { Effect, Schema } from "effect"

export class NotEnoughDisk extends Schema.TaggedError<NotEnoughDisk>()("NotEnoughDisk", {
  directory: Schema.String,
  needed: Schema.Number,
  free: Schema.Number,
  what: Schema.String,
}) {
  override get message() {
    const gb = (b: number) => `${(b / 1e9).toFixed(1)} GB`
    return `${this.directory} has ${gb(this.free)} free but ${this.what} needs ${gb(this.needed)}: choose another --dir or a smaller model (--params, --layers, --vocab)`
  }
}

export class DiskToolFailed extends Schema.TaggedError<DiskToolFailed>()("DiskToolFailed", {
  command: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `\`${this.command}\` failed: ${this.detail}`
  }
}

const sh = (file: string, args: ReadonlyArray<string>) =>
  Effect.try({
    try: () => execFileSync(file, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }),
    catch: (e) =>
      new DiskToolFailed({
        command: [file, ...args].join(" "),
        detail: String((e as { stderr?: string }).stderr || (e as Error).message).trim(),
      }),
  })

/** Bytes an unprivileged writer may still use under `dir`. */
export const freeBytes = (dir: string): number => {
  const s = statfsSync(dir)
  return s.bavail * s.bsize
}

/** Fails unless `needed` bytes are free under `dir`. */
export const requireFree = (dir: string, needed: number, what: string) =>
  Effect.suspend(() => {
    const free = freeBytes(dir)
    return free >= needed
      ? Effect.void
      : Effect.fail(new NotEnoughDisk({ directory: dir, needed, free, what }))
  })

/** File system type and backing device ("ext4 on /dev/nvme0n1p1"); compressing ones flatter zeros. */
export const describeDisk = (dir: string): string => {
  try {
    const out = execFileSync("df", ["--output=fstype,source", dir], { encoding: "utf8" }).trim().split("\n")
    const [type, source] = (out.at(-1) ?? "").trim().split(/\s+/)
    return `${type ?? "?"} on ${source ?? "?"}`
  } catch {
    return "unknown"
  }
}

/**
 * Empties the whole page cache (root with a writable /proc/sys only): true where it was allowed.
 * Dirty pages are synced first, since drop_caches only drops clean ones.
 */
export const dropCaches = (): boolean => {
  try {
    execFileSync("sh", ["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"], { stdio: "ignore" })
    return true
  } catch {
    return false
  }
}

/**
 * Takes every file under `dir` out of the page cache without privileges: dd's `iflag=nocache`
 * with `count=0` is posix_fadvise(DONTNEED) over the whole file, which drops its clean pages (the
 * Checkpointer fsyncs everything it writes, so all of them are clean).
 */
export const evictTree = (dir: string) =>
  sh("find", [
    dir,
    "-type",
    "f",
    "-exec",
    "sh",
    "-c",
    'for f; do dd if="$f" iflag=nocache count=0 status=none || exit 1; done',
    "sh",
    "{}",
    "+",
  ]).pipe(Effect.asVoid)

/** How a cold read was arranged: the whole cache dropped, or only the files read evicted. */
export type CacheMethod = "drop_caches" | "fadvise"

/** Makes the next read of the files under `dir` come from the disk. */
export const coldCache = (dir: string): Effect.Effect<CacheMethod, DiskToolFailed> =>
  Effect.suspend(() =>
    dropCaches()
      ? Effect.succeed("drop_caches" as const)
      : evictTree(dir).pipe(Effect.as("fadvise" as const)),
  )

const BLOCK = 64 * 1024 * 1024

export interface RawBandwidth {
  readonly bytes: number
  readonly writeSeconds: number
  readonly readSeconds: number
  /** "buffered after drop_caches", or "O_DIRECT" where the cache could not be dropped. */
  readonly readMethod: string
}

/**
 * Sequential write (`conv=fsync`: the time includes making it durable) and read of one file of
 * about `bytes` in 64 MiB blocks, then removes it. The read follows a dropped page cache where
 * that is permitted, else it bypasses the cache with `iflag=direct`.
 */
export const rawBandwidth = (file: string, bytes: number): Effect.Effect<RawBandwidth, DiskToolFailed> =>
  Effect.gen(function* () {
    const count = Math.max(1, Math.ceil(bytes / BLOCK))
    const timed = <A, E>(e: Effect.Effect<A, E>) =>
      Effect.gen(function* () {
        const t0 = performance.now()
        yield* e
        return (performance.now() - t0) / 1000
      })
    const writeSeconds = yield* timed(
      sh("dd", ["if=/dev/zero", `of=${file}`, `bs=${BLOCK}`, `count=${count}`, "conv=fsync", "status=none"]),
    )
    const dropped = dropCaches()
    const readSeconds = yield* timed(
      sh("dd", [
        `if=${file}`,
        "of=/dev/null",
        `bs=${BLOCK}`,
        ...(dropped ? [] : ["iflag=direct"]),
        "status=none",
      ]),
    )
    return {
      bytes: count * BLOCK,
      writeSeconds,
      readSeconds,
      readMethod: dropped ? "buffered after drop_caches" : "O_DIRECT",
    }
  }).pipe(Effect.ensuring(Effect.sync(() => execFileSync("rm", ["-f", file]))))
