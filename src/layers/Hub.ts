/**
 * Model and dataset repositories, fetched the way Hugging Face tools fetch them.
 *
 * `Hub.layer` downloads with `@huggingface/hub` into the standard Hugging Face cache
 * (`models--org--name/{blobs,snapshots/<commit>,refs/<revision>}`), so a cache filled by Python
 * tools is reused as is and ours is usable by them. `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`,
 * `HF_TOKEN` and `HF_ENDPOINT` mean what they mean there. A repo that names a local directory is
 * read from there directly, as `from_pretrained` does.
 *
 * Where `@huggingface/hub` falls short we work around it in the smallest way:
 * - `downloadFileToCacheDir` files a snapshot under the last commit that touched the file (not the
 *   revision's commit) and never writes `refs/`, so we resolve the revision to its commit first,
 *   write `refs/<revision>` ourselves and download by commit;
 * - `snapshotDownload` has no allow patterns and downloads one file at a time, so `snapshot` lists
 *   the tree and downloads the matching files itself, a few at a time;
 * - the library refuses tokens not starting with `hf_` and would copy the token into its own
 *   values, so it never sees the token: our `fetch` adds the header, for the Hub's origin only.
 */
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import {
  datasetInfo,
  downloadFileToCacheDir,
  listFiles as hubListFiles,
  type ListFileEntry,
  modelInfo,
} from "@huggingface/hub"
import { Context, type Duration, Effect, Layer, Option, Redacted, Schedule, Schema } from "effect"
import { makeDirectories } from "./makeDirectories.ts"

export type RepoType = "model" | "dataset"

const RepoTypeSchema = Schema.Literals(["model", "dataset"])

/** The revision reported for files of a local directory, which has none. */
const LOCAL = "local"

// ---------------------------------------------------------------------------------------------
// Errors

/** The repo id is not of the form `name` or `org/name`. */
export class HubInvalidRepo extends Schema.TaggedError<HubInvalidRepo>()("HubInvalidRepo", {
  repo: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return (
      `"${this.repo}" is not a valid repository id (${this.reason}). ` +
      "Give a Hub id such as org/name, or a local directory as an absolute path or one starting with ./"
    )
  }
}

/** A file path (from the caller or from the server's listing) that would leave the repo or cache directory. */
export class HubUnsafePath extends Schema.TaggedError<HubUnsafePath>()("HubUnsafePath", {
  repo: Schema.String,
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return (
      `refused path "${this.path}" in repository "${this.repo}": ${this.reason}. ` +
      "Repository paths are relative, use / as separator and contain no .. segment"
    )
  }
}

export class HubRepoNotFound extends Schema.TaggedError<HubRepoNotFound>()("HubRepoNotFound", {
  repo: Schema.String,
  repoType: RepoTypeSchema,
  /** The Hub endpoint, or the local directory that was searched. */
  source: Schema.String,
}) {
  override get message() {
    if (this.source.startsWith("local directory"))
      return `"${this.repo}" is not a directory (${this.source}). Give an existing directory, or a Hub id such as org/name`
    const hint =
      this.repoType === "model"
        ? ' (for a dataset pass repoType: "dataset")'
        : ' (for a model leave out repoType: "dataset")'
    return (
      `${this.repoType} repository "${this.repo}" was not found at ${this.source}. ` +
      `Check the id${hint}; if it is private or gated, set HF_TOKEN to a token that can read it`
    )
  }
}

export class HubRevisionNotFound extends Schema.TaggedError<HubRevisionNotFound>()("HubRevisionNotFound", {
  repo: Schema.String,
  repoType: RepoTypeSchema,
  revision: Schema.String,
  source: Schema.String,
}) {
  override get message() {
    return (
      `revision "${this.revision}" of ${this.repoType} repository "${this.repo}" was not found at ${this.source}. ` +
      "Give an existing branch, tag or full commit hash"
    )
  }
}

export class HubFileNotFound extends Schema.TaggedError<HubFileNotFound>()("HubFileNotFound", {
  repo: Schema.String,
  repoType: RepoTypeSchema,
  revision: Schema.String,
  file: Schema.String,
  source: Schema.String,
}) {
  override get message() {
    if (this.revision === LOCAL)
      return `file "${this.file}" of "${this.repo}" is not in the local directory ${this.source}. Check the file name`
    return (
      `file "${this.file}" is not in ${this.repoType} repository "${this.repo}" ` +
      `(revision ${this.revision}, ${this.source}). Check the file name and the revision`
    )
  }
}

/** 401/403: the repository is private or gated and the token (if any) may not read it. */
export class HubAccessDenied extends Schema.TaggedError<HubAccessDenied>()("HubAccessDenied", {
  repo: Schema.String,
  repoType: RepoTypeSchema,
  status: Schema.Number,
  gated: Schema.Boolean,
  authenticated: Schema.Boolean,
  source: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    const page = `${this.source}/${this.repoType === "dataset" ? "datasets/" : ""}${this.repo}`
    const token = this.authenticated
      ? "the token in HF_TOKEN may not read it: use one with read access"
      : "no token was sent: set HF_TOKEN to a token with read access"
    const license = this.gated
      ? `it is gated: accept its license at ${page} with that account`
      : `if it is gated, accept its license at ${page}`
    const said = this.detail ? ` (server: ${this.detail})` : ""
    return `access to ${this.repoType} repository "${this.repo}" was refused, HTTP ${this.status}${said}: ${token}; ${license}`
  }
}

/** HF_HUB_OFFLINE is set and what was asked for is not in the cache. */
export class HubNotCached extends Schema.TaggedError<HubNotCached>()("HubNotCached", {
  repo: Schema.String,
  repoType: RepoTypeSchema,
  revision: Schema.String,
  file: Schema.optional(Schema.String),
  cacheDir: Schema.String,
}) {
  override get message() {
    const what = this.file === undefined ? "a snapshot" : `file "${this.file}"`
    return (
      `${what} of ${this.repoType} repository "${this.repo}" (revision ${this.revision}) is not in the ` +
      `Hugging Face cache ${this.cacheDir}, and HF_HUB_OFFLINE is set so the network is not used. ` +
      "Unset HF_HUB_OFFLINE to download it, or download it first (with network access) into this cache"
    )
  }
}

/** The Hub endpoint could not be reached at all (DNS, refused connection, TLS, reset). */
export class HubNetworkError extends Schema.TaggedError<HubNetworkError>()("HubNetworkError", {
  repo: Schema.String,
  endpoint: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return (
      `could not reach ${this.endpoint} for repository "${this.repo}": ${this.detail}. ` +
      "Check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the local cache"
    )
  }
}

/** Any other answer from the Hub: rate limits and 5xx (after retries), or a malformed reply. */
export class HubRequestFailed extends Schema.TaggedError<HubRequestFailed>()("HubRequestFailed", {
  repo: Schema.String,
  /** HTTP status; 0 where the reply could not be used at all. */
  status: Schema.Number,
  url: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    const status = this.status === 0 ? "failed" : `failed with HTTP ${this.status}`
    const fix =
      this.status === 429 || this.status >= 500
        ? "The Hub is busy or down: retry later, or set HF_HUB_OFFLINE=1 to use the cache"
        : "Check HF_ENDPOINT and the repository id"
    return `request for repository "${this.repo}" to ${this.url} ${status}: ${this.detail}. ${fix}`
  }
}

/** The cache (or a local repository directory) could not be read or written. */
export class HubCacheError extends Schema.TaggedError<HubCacheError>()("HubCacheError", {
  path: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return (
      `cannot use ${this.path}: ${this.detail}. ` +
      "Check its permissions and free space, or point HF_HOME / HF_HUB_CACHE elsewhere"
    )
  }
}

export type HubError =
  | HubInvalidRepo
  | HubUnsafePath
  | HubRepoNotFound
  | HubRevisionNotFound
  | HubFileNotFound
  | HubAccessDenied
  | HubNotCached
  | HubNetworkError
  | HubRequestFailed
  | HubCacheError

// ---------------------------------------------------------------------------------------------
// The service

export interface ResolveOptions {
  /** Branch, tag or commit hash; "main" by default. Ignored for local directories. */
  readonly revision?: string
  /** "model" by default; a repo written `datasets/org/name` is a dataset. */
  readonly repoType?: RepoType
}

export interface SnapshotOptions extends ResolveOptions {
  /** Only files matching one of these fnmatch patterns (as huggingface_hub: `*` also crosses `/`). */
  readonly allowPatterns?: ReadonlyArray<string>
  /** Leave out files matching one of these patterns. */
  readonly ignorePatterns?: ReadonlyArray<string>
}

export class Hub extends Context.Service<
  Hub,
  {
    /** A local path to one file of the repo, downloaded into the cache if needed. */
    readonly resolveFile: (
      repo: string,
      file: string,
      options?: ResolveOptions,
    ) => Effect.Effect<string, HubError>
    /** A local directory holding the repo's files (those matching the patterns), like snapshot_download. */
    readonly snapshot: (repo: string, options?: SnapshotOptions) => Effect.Effect<string, HubError>
    /** The repo's file paths, sorted; offline, those of the cached snapshot. */
    readonly listFiles: (
      repo: string,
      options?: ResolveOptions,
    ) => Effect.Effect<ReadonlyArray<string>, HubError>
  }
>()("magix/Hub") {
  /** The real Hub, configured from the given environment. */
  static readonly layerWith = (env: HubEnvironment, options: HubOptions = {}): Layer.Layer<Hub> =>
    Layer.effect(Hub, makeRemoteHub(env, options))

  /** The real Hub, configured from `process.env` when the layer is built. */
  static readonly layer: Layer.Layer<Hub> = Layer.unwrap(Effect.sync(() => Hub.layerWith(fromProcessEnv())))

  /** Repos are subdirectories of `root` (`root/org/name/...`), for tests and offline mirrors. */
  static readonly localDirectory = (root: string): Layer.Layer<Hub> =>
    Layer.succeed(Hub, makeDirectoryHub(path.resolve(root)))

  /**
   * Repos held in memory (`{ "org/name": { "config.json": "{...}" } }`), written to a temporary
   * directory that lives as long as the layer.
   */
  static readonly memory = (
    repos: Readonly<Record<string, Readonly<Record<string, Uint8Array | string>>>>,
  ): Layer.Layer<Hub, HubUnsafePath | HubInvalidRepo | HubCacheError> =>
    Layer.effect(
      Hub,
      Effect.gen(function* () {
        const root = yield* Effect.acquireRelease(
          fsTry(os.tmpdir(), () => fs.mkdtemp(path.join(os.tmpdir(), "magix-hub-"))),
          (dir) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true })),
        )
        for (const [repo, files] of Object.entries(repos)) {
          const ref = yield* parseRepoId(repo, undefined)
          for (const [file, content] of Object.entries(files)) {
            const rel = yield* checkRepoPath(repo, file)
            const target = path.join(root, ref.name, rel)
            yield* fsTry(target, async () => {
              await makeDirectories(path.dirname(target))
              await fs.writeFile(target, content)
            })
          }
          yield* fsTry(root, () => makeDirectories(path.join(root, ref.name)))
        }
        return makeDirectoryHub(root)
      }),
    )
}

// ---------------------------------------------------------------------------------------------
// Environment

/** The variables the Hub reads, as Python's huggingface_hub reads them. */
export const hubVariables = [
  "HF_HOME",
  "HF_HUB_CACHE",
  "HUGGINGFACE_HUB_CACHE",
  "XDG_CACHE_HOME",
  "HF_HUB_OFFLINE",
  "TRANSFORMERS_OFFLINE",
  "HF_TOKEN",
  "HUGGING_FACE_HUB_TOKEN",
  "HF_TOKEN_PATH",
  "HF_ENDPOINT",
] as const

export type HubEnvironment = { readonly [K in (typeof hubVariables)[number]]?: string | undefined }

export const fromProcessEnv = (): HubEnvironment =>
  Object.fromEntries(hubVariables.map((k) => [k, process.env[k]]))

export interface HubOptions {
  /** Retries after a 429 or 5xx answer (default 3). */
  readonly maxRetries?: number
  /** First retry delay, doubled each time (default 500 ms). */
  readonly retryDelay?: Duration.Input
  /** Files downloaded at once by `snapshot` (default 4). */
  readonly concurrency?: number
}

export interface HubSettings {
  readonly cacheDir: string
  /** Without a trailing slash. */
  readonly endpoint: string
  readonly offline: boolean
  /** From HF_TOKEN (or HUGGING_FACE_HUB_TOKEN); else the layer reads `tokenPath`, as `hf auth login` writes it. */
  readonly token: Redacted.Redacted<string> | undefined
  readonly tokenPath: string
}

const expandHome = (p: string) => (p === "~" || p.startsWith("~/") ? path.join(os.homedir(), p.slice(1)) : p)
const nonEmpty = (v: string | undefined) => (v === undefined || v.trim() === "" ? undefined : v.trim())
// huggingface_hub's `_is_true`
const isTrue = (v: string | undefined) => ["1", "ON", "YES", "TRUE"].includes((v ?? "").trim().toUpperCase())

export const hubSettings = (env: HubEnvironment): HubSettings => {
  const hfHome = expandHome(
    nonEmpty(env.HF_HOME) ??
      path.join(nonEmpty(env.XDG_CACHE_HOME) ?? path.join(os.homedir(), ".cache"), "huggingface"),
  )
  const cacheDir = expandHome(
    nonEmpty(env.HF_HUB_CACHE) ?? nonEmpty(env.HUGGINGFACE_HUB_CACHE) ?? path.join(hfHome, "hub"),
  )
  const token = nonEmpty(env.HF_TOKEN) ?? nonEmpty(env.HUGGING_FACE_HUB_TOKEN)
  return {
    cacheDir: path.resolve(cacheDir),
    endpoint: (nonEmpty(env.HF_ENDPOINT) ?? "https://huggingface.co").replace(/\/+$/, ""),
    offline: isTrue(nonEmpty(env.HF_HUB_OFFLINE) ?? env.TRANSFORMERS_OFFLINE),
    token: token === undefined ? undefined : Redacted.make(token),
    tokenPath: expandHome(nonEmpty(env.HF_TOKEN_PATH) ?? path.join(hfHome, "token")),
  }
}

// ---------------------------------------------------------------------------------------------
// Paths and ids

interface RepoRef {
  /** As written by the caller, for messages. */
  readonly id: string
  readonly name: string
  readonly type: RepoType
}

const REPO_NAME = /^[\w.-]+(\/[\w.-]+)?$/
const COMMIT = /^[0-9a-f]{40}$/

const parseRepoId = (repo: string, repoType: RepoType | undefined): Effect.Effect<RepoRef, HubInvalidRepo> =>
  Effect.suspend(() => {
    let name = repo
    let type: RepoType = repoType ?? "model"
    if (repo.startsWith("datasets/") && repoType !== "model") {
      name = repo.slice("datasets/".length)
      type = "dataset"
    }
    const fail = (reason: string) => Effect.fail(new HubInvalidRepo({ repo, reason }))
    if (!REPO_NAME.test(name)) return fail("use letters, digits, '-', '_' and '.', as name or org/name")
    if (name.includes("--") || name.includes("..")) return fail("'--' and '..' are not allowed")
    if (name.split("/").some((s) => /^[-.]|[-.]$/.test(s)))
      return fail("a part may not start or end with '-' or '.'")
    if (name.length > 96) return fail("longer than 96 characters")
    return Effect.succeed({ id: repo, name, type })
  })

/** A repo-relative path that stays inside the repo, normalised to `a/b/c`. */
const checkRepoPath = (repo: string, file: string): Effect.Effect<string, HubUnsafePath> =>
  Effect.suspend(() => {
    const fail = (reason: string) => Effect.fail(new HubUnsafePath({ repo, path: file, reason }))
    if (file === "" || file.includes("\0")) return fail("empty or holds a NUL character")
    if (file.startsWith("/") || file.startsWith("\\") || /^[a-zA-Z]:/.test(file))
      return fail("absolute paths are not repository paths")
    const parts = file.split("/").filter((p) => p !== "" && p !== ".")
    if (parts.some((p) => p === ".." || p.includes("\\") || /^[a-zA-Z]:/.test(p)))
      return fail("it would leave the repository")
    if (parts.length === 0) return fail("it names the repository root, not a file")
    return Effect.succeed(parts.join("/"))
  })

/** Revisions become paths under refs/, so they must stay there too. */
const checkRevision = (repo: string, revision: string): Effect.Effect<string, HubUnsafePath> =>
  revision === "" || revision.startsWith("/") || revision.split("/").some((p) => p === ".." || p === "")
    ? Effect.fail(new HubUnsafePath({ repo, path: revision, reason: "not a valid revision name" }))
    : Effect.succeed(revision)

const repoFolder = (ref: RepoRef) => `${ref.type}s--${ref.name.split("/").join("--")}`

// transformers treats these as paths even when nothing is there, so the error can say so.
const looksLikePath = (repo: string) =>
  path.isAbsolute(repo) || repo === "." || repo === ".." || /^(\.{1,2}|~)[\\/]/.test(repo)

const describe = (e: unknown): string => {
  if (e instanceof Error) {
    const cause = e.cause instanceof Error ? `: ${e.cause.message}` : ""
    return `${e.message}${cause}`
  }
  return String(e)
}

const fsTry = <A>(p: string, f: () => Promise<A>): Effect.Effect<A, HubCacheError> =>
  Effect.tryPromise({ try: f, catch: (e) => new HubCacheError({ path: p, detail: describe(e) }) })

const statOf = (p: string) =>
  Effect.promise(() =>
    fs.stat(p).then(
      (s) => s,
      () => undefined,
    ),
  )
const isFile = (p: string) => Effect.map(statOf(p), (s) => s?.isFile() === true)
const isDirectory = (p: string) => Effect.map(statOf(p), (s) => s?.isDirectory() === true)

/**
 * Files under `dir`, relative and sorted; symlinks followed (cache snapshots are symlinks), each
 * real directory once: a link to a parent would otherwise be walked until ELOOP, doubling with
 * every second such link.
 */
const walkFiles = (dir: string): Effect.Effect<ReadonlyArray<string>, HubCacheError> =>
  fsTry(dir, async () => {
    const out: string[] = []
    const walked = new Set<string>()
    const visit = async (rel: string): Promise<void> => {
      const real = await fs.realpath(path.join(dir, rel))
      if (walked.has(real)) return
      walked.add(real)
      for (const entry of await fs.readdir(path.join(dir, rel), { withFileTypes: true })) {
        const child = rel === "" ? entry.name : `${rel}/${entry.name}`
        // VCS data and huggingface_hub's local_dir metadata are not repository files.
        if (entry.name === ".git" || child === ".cache") continue
        const stat = entry.isSymbolicLink()
          ? await fs.stat(path.join(dir, child)).catch(() => undefined)
          : entry
        if (stat?.isDirectory()) await visit(child)
        else if (stat?.isFile()) out.push(child)
      }
    }
    await visit("")
    return out.sort()
  })

/** Python's fnmatch, as huggingface_hub's filter_repo_objects uses it. */
export const fnmatch = (pattern: string): RegExp => {
  const p = pattern.endsWith("/") ? `${pattern}*` : pattern
  let re = ""
  for (let i = 0; i < p.length; i++) {
    const c = p[i]!
    if (c === "*") re += ".*"
    else if (c === "?") re += "."
    else if (c === "[") {
      const start = p[i + 1] === "!" ? i + 2 : i + 1
      const close = p.indexOf("]", start + 1)
      if (close === -1) re += "\\["
      else {
        const body = p.slice(start, close).replace(/\\/g, "\\\\")
        re += p[i + 1] === "!" ? `[^${body}]` : `[${body.startsWith("^") ? `\\${body}` : body}]`
        i = close
      }
    } else re += c.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")
  }
  return new RegExp(`^${re}$`, "s")
}

const patternFilter = (options: SnapshotOptions) => {
  const allow = options.allowPatterns?.map(fnmatch)
  const ignore = options.ignorePatterns?.map(fnmatch) ?? []
  return (file: string) =>
    (allow === undefined || allow.some((r) => r.test(file))) && !ignore.some((r) => r.test(file))
}

// ---------------------------------------------------------------------------------------------
// Local directories

/**
 * Whether `target`, symlinks followed, stays inside the repository directory `dir`, or, for a
 * Hugging Face cache snapshot (whose files link to `../../blobs`), inside that entry's blobs: a
 * link in a repository must not hand out a file elsewhere on the machine.
 */
const staysInside = (dir: string, target: string): Effect.Effect<boolean> =>
  Effect.promise(async () => {
    const real = await fs.realpath(target).catch(() => undefined)
    if (real === undefined) return false
    const within = (root: string) => real === root || real.startsWith(root + path.sep)
    const realDir = await fs.realpath(dir).catch(() => dir)
    if (within(realDir)) return true
    for (const d of new Set([dir, realDir]))
      if (path.basename(path.dirname(d)) === "snapshots") {
        const blobs = await fs.realpath(path.join(d, "..", "..", "blobs")).catch(() => undefined)
        if (blobs !== undefined && within(blobs)) return true
      }
    return false
  })

/** A repo read from `dir`; errors name it `repo`, as the caller wrote it. */
const localRepo = (dir: string, repo: string, repoType: RepoType | undefined) => {
  const type = repoType ?? "model"
  return {
    resolveFile: (file: string) =>
      Effect.gen(function* () {
        const rel = yield* checkRepoPath(repo, file)
        const target = path.join(dir, rel)
        if ((yield* isFile(target)) && !(yield* staysInside(dir, target)))
          return yield* new HubUnsafePath({
            repo,
            path: rel,
            reason: "it is a link to a file outside the repository",
          })
        if (yield* isFile(target)) return target
        return yield* new HubFileNotFound({ repo, repoType: type, revision: LOCAL, file: rel, source: dir })
      }),
    snapshot: Effect.succeed(dir),
    listFiles: walkFiles(dir),
  }
}

/**
 * A repo given as a local directory, or `undefined` when it is a Hub id. A path-like repo that is
 * not a directory is an error rather than a Hub id.
 */
const asLocalRepo = (
  repo: string,
  repoType: RepoType | undefined,
): Effect.Effect<ReturnType<typeof localRepo> | undefined, HubRepoNotFound> =>
  Effect.gen(function* () {
    const dir = path.resolve(expandHome(repo))
    if (yield* isDirectory(dir)) return localRepo(dir, repo, repoType)
    if (looksLikePath(repo))
      return yield* new HubRepoNotFound({
        repo,
        repoType: repoType ?? "model",
        source: `local directory ${dir}`,
      })
    return undefined
  })

const makeDirectoryHub = (root: string) => {
  const inRoot = (repo: string, repoType: RepoType | undefined) =>
    Effect.gen(function* () {
      const local = yield* asLocalRepo(repo, repoType)
      if (local !== undefined) return local
      const ref = yield* parseRepoId(repo, repoType)
      const dir = path.join(root, ref.name)
      if (!(yield* isDirectory(dir)))
        return yield* new HubRepoNotFound({ repo, repoType: ref.type, source: `local directory ${root}` })
      return localRepo(dir, repo, ref.type)
    })
  return Hub.of({
    resolveFile: (repo, file, options = {}) =>
      Effect.flatMap(inRoot(repo, options.repoType), (r) => r.resolveFile(file)),
    snapshot: (repo, options = {}) => Effect.flatMap(inRoot(repo, options.repoType), (r) => r.snapshot),
    listFiles: (repo, options = {}) => Effect.flatMap(inRoot(repo, options.repoType), (r) => r.listFiles),
  })
}

// ---------------------------------------------------------------------------------------------
// The real Hub

/** What one HTTP exchange left behind, for turning a library exception into a typed error. */
type Trace =
  | { readonly kind: "none" }
  | { readonly kind: "network"; readonly url: string; readonly detail: string }
  | {
      readonly kind: "http"
      readonly url: string
      readonly status: number
      readonly code: string
      readonly serverMessage: string
    }
  | { readonly kind: "missing-entry"; readonly url: string }

interface CallContext {
  readonly ref: RepoRef
  readonly revision: string
  readonly file?: string
}

const isTransient = (e: HubError) => e._tag === "HubRequestFailed" && (e.status === 429 || e.status >= 500)

const makeRemoteHub = (env: HubEnvironment, options: HubOptions) =>
  Effect.gen(function* () {
    const settings = hubSettings(env)
    const { cacheDir, endpoint, offline } = settings
    const token =
      settings.token ??
      (yield* Effect.promise(() =>
        fs.readFile(settings.tokenPath, "utf8").then(
          (t) => (t.trim() === "" ? undefined : Redacted.make(t.trim())),
          () => undefined,
        ),
      ))
    const endpointOrigin = (() => {
      try {
        return new URL(endpoint).origin
      } catch {
        return endpoint
      }
    })()
    const maxRetries = options.maxRetries ?? 3
    const retryDelay = options.retryDelay ?? "500 millis"
    const concurrency = options.concurrency ?? 4

    // The token must never reach an error, a log line or a defect, whatever a server echoes back.
    const scrub = (text: string): string => {
      let out = text.replace(/(Bearer\s+)[^\s"',;]+/gi, "$1***")
      if (token !== undefined) {
        const secret = Redacted.value(token)
        for (const form of new Set([secret, encodeURIComponent(secret)])) out = out.split(form).join("***")
      }
      return out
    }

    const tracedFetch =
      (trace: { current: Trace }, signal: AbortSignal): typeof fetch =>
      async (input, init) => {
        const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url
        const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined))
        const sameOrigin = (() => {
          try {
            return new URL(url).origin === endpointOrigin
          } catch {
            return false
          }
        })()
        if (token !== undefined && sameOrigin && !headers.has("authorization"))
          headers.set("authorization", `Bearer ${Redacted.value(token)}`)
        const abort = init?.signal ? AbortSignal.any([init.signal, signal]) : signal
        let response: Response
        try {
          response = await fetch(input, { ...init, headers, signal: abort })
        } catch (e) {
          const cause = e instanceof Error && e.cause instanceof Error ? e.cause : undefined
          const code = (cause as { code?: unknown } | undefined)?.code
          trace.current = {
            kind: "network",
            url,
            detail: typeof code === "string" ? `${code} (${cause?.message})` : describe(e),
          }
          throw e
        }
        if (!response.ok) {
          trace.current = {
            kind: "http",
            url: response.url || url,
            status: response.status,
            code: response.headers.get("x-error-code") ?? "",
            serverMessage: response.headers.get("x-error-message") ?? "",
          }
        } else if (url.includes("/paths-info/")) {
          // The Hub answers a missing path with an empty list, which the library reports as a bare Error.
          const body: unknown = await response
            .clone()
            .json()
            .catch(() => undefined)
          if (Array.isArray(body) && body.length === 0) trace.current = { kind: "missing-entry", url }
        }
        return response
      }

    const classify = (error: unknown, trace: Trace, ctx: CallContext): HubError => {
      const { ref, revision } = ctx
      const repo = ref.id
      const base = { repo, repoType: ref.type }
      switch (trace.kind) {
        case "network":
          return new HubNetworkError({ repo, endpoint, detail: scrub(trace.detail) })
        case "missing-entry":
          return new HubFileNotFound({ ...base, revision, file: ctx.file ?? "", source: endpoint })
        case "http": {
          // The library's message repeats the URL; the server's own words are what helps.
          const detail = scrub(trace.serverMessage || describe(error).replace(/\.? URL: .*$/s, ""))
          const isResolve = /\/resolve\//.test(trace.url)
          if (trace.code === "RevisionNotFound")
            return new HubRevisionNotFound({ ...base, revision, source: endpoint })
          if (trace.code === "EntryNotFound" && ctx.file !== undefined)
            return new HubFileNotFound({ ...base, revision, file: ctx.file, source: endpoint })
          if (trace.code === "RepoNotFound") return new HubRepoNotFound({ ...base, source: endpoint })
          if (trace.code === "GatedRepo" || trace.status === 401 || trace.status === 403)
            return new HubAccessDenied({
              ...base,
              status: trace.status,
              gated: trace.code === "GatedRepo",
              authenticated: token !== undefined,
              source: endpoint,
              detail,
            })
          if (trace.status === 404)
            return isResolve && ctx.file !== undefined
              ? new HubFileNotFound({ ...base, revision, file: ctx.file, source: endpoint })
              : new HubRepoNotFound({ ...base, source: endpoint })
          return new HubRequestFailed({
            repo,
            status: trace.status,
            url: scrub(trace.url.split("?")[0]!),
            detail,
          })
        }
        case "none": {
          const coded = error as { code?: unknown; path?: unknown; cause?: { code?: unknown } } | undefined
          // File system errors carry the path; a connection dropped while streaming a body does not.
          if (typeof coded?.code === "string" && typeof coded.path === "string")
            return new HubCacheError({ path: scrub(coded.path), detail: scrub(describe(error)) })
          const code = typeof coded?.code === "string" ? coded.code : coded?.cause?.code
          if (typeof code === "string")
            return new HubNetworkError({ repo, endpoint, detail: scrub(`${code} (${describe(error)})`) })
          if (error instanceof TypeError && /Invalid filename/.test(error.message))
            return new HubUnsafePath({ repo, path: ctx.file ?? "", reason: scrub(error.message) })
          return new HubRequestFailed({ repo, status: 0, url: endpoint, detail: scrub(describe(error)) })
        }
      }
    }

    /** One library call with its own traced fetch, retried on 429 and 5xx. */
    const call = <A>(
      ctx: CallContext,
      run: (fetch: typeof globalThis.fetch) => Promise<A>,
    ): Effect.Effect<A, HubError> =>
      Effect.suspend(() => {
        const trace: { current: Trace } = { current: { kind: "none" } }
        return Effect.tryPromise({
          try: (signal) => run(tracedFetch(trace, signal)),
          catch: (error) => classify(error, trace.current, ctx),
        })
      }).pipe(
        Effect.retry({ while: isTransient, times: maxRetries, schedule: Schedule.exponential(retryDelay) }),
      )

    const storageOf = (ref: RepoRef) => path.join(cacheDir, repoFolder(ref))
    // A commit is immutable, so what we learn about one holds for the life of the layer; a revision
    // is resolved once per layer, so every file a run loads comes from one commit.
    const commits = new Map<string, string>()
    const trees = new Map<string, ReadonlyArray<ListFileEntry>>()
    const keyOf = (ref: RepoRef, revision: string) => `${ref.type}:${ref.name}@${revision}`

    /** The commit a revision points to in the cache (refs/<revision>), as Python tools left it. */
    const cachedCommit = (ref: RepoRef, revision: string) =>
      COMMIT.test(revision)
        ? Effect.succeed(Option.some(revision))
        : Effect.promise(() =>
            fs.readFile(path.join(storageOf(ref), "refs", revision), "utf8").then(
              (c) => (COMMIT.test(c.trim()) ? Option.some(c.trim()) : Option.none<string>()),
              () => Option.none<string>(),
            ),
          )

    const commitOnline = (ref: RepoRef, revision: string): Effect.Effect<string, HubError> =>
      Effect.gen(function* () {
        if (COMMIT.test(revision)) return revision
        const known = commits.get(keyOf(ref, revision))
        if (known !== undefined) return known
        const info = yield* call({ ref, revision }, (fetch) =>
          ref.type === "model"
            ? modelInfo({ name: ref.name, revision, additionalFields: ["sha"], hubUrl: endpoint, fetch })
            : datasetInfo({ name: ref.name, revision, additionalFields: ["sha"], hubUrl: endpoint, fetch }),
        )
        const sha: unknown = info.sha
        if (typeof sha !== "string" || !COMMIT.test(sha))
          return yield* new HubRequestFailed({
            repo: ref.id,
            status: 0,
            url: endpoint,
            detail: `the revision info for "${revision}" has no commit hash`,
          })
        const refPath = path.join(storageOf(ref), "refs", revision)
        const current = yield* Effect.promise(() => fs.readFile(refPath, "utf8").catch(() => ""))
        if (current.trim() !== sha)
          yield* fsTry(refPath, async () => {
            await makeDirectories(path.dirname(refPath))
            await fs.writeFile(refPath, sha)
          })
        commits.set(keyOf(ref, revision), sha)
        return sha
      })

    /**
     * As huggingface_hub does, a failed lookup (unreachable Hub, 5xx, refused access) falls back to
     * the cache when the revision is there; only the answer "no such revision" is final.
     */
    const commitFor = (ref: RepoRef, revision: string) =>
      commitOnline(ref, revision).pipe(
        Effect.catch(
          (e): Effect.Effect<string, HubError> =>
            e._tag === "HubRevisionNotFound" || e._tag === "HubCacheError"
              ? Effect.fail(e)
              : Effect.flatMap(cachedCommit(ref, revision), (cached) =>
                  Option.isSome(cached)
                    ? Effect.as(
                        Effect.logWarning(
                          `using the cached ${ref.id}@${revision} (commit ${cached.value}): ${e.message}`,
                        ),
                        cached.value,
                      )
                    : Effect.fail(e),
                ),
        ),
      )

    const notCached = (ref: RepoRef, revision: string, file?: string) =>
      new HubNotCached({ repo: ref.id, repoType: ref.type, revision, cacheDir, ...(file ? { file } : {}) })

    const offlineCommit = (ref: RepoRef, revision: string, file?: string) =>
      Effect.flatMap(cachedCommit(ref, revision), (c) =>
        Option.isSome(c) ? Effect.succeed(c.value) : Effect.fail(notCached(ref, revision, file)),
      )

    const tree = (ref: RepoRef, revision: string, commit: string) =>
      Effect.gen(function* () {
        const known = trees.get(keyOf(ref, commit))
        if (known !== undefined) return known
        const entries = yield* call({ ref, revision }, async (fetch) => {
          const out: ListFileEntry[] = []
          for await (const e of hubListFiles({
            repo: { type: ref.type, name: ref.name },
            revision: commit,
            recursive: true,
            hubUrl: endpoint,
            fetch,
          }))
            out.push(e)
          return out
        })
        trees.set(keyOf(ref, commit), entries)
        return entries
      })

    const remote = (repo: string, options: ResolveOptions) =>
      Effect.gen(function* () {
        const ref = yield* parseRepoId(repo, options.repoType)
        const revision = yield* checkRevision(repo, options.revision ?? "main")
        return { ref, revision, storage: storageOf(ref) }
      })

    const download = (ref: RepoRef, revision: string, commit: string, file: string) =>
      Effect.gen(function* () {
        const storage = storageOf(ref)
        const pointer = path.join(storage, "snapshots", commit, file)
        if (yield* isFile(pointer)) return pointer
        // Python records files known to be missing at a commit here; a commit never changes.
        const noExist = path.join(storage, ".no_exist", commit, file)
        const missing = new HubFileNotFound({
          repo: ref.id,
          repoType: ref.type,
          revision,
          file,
          source: endpoint,
        })
        if (yield* isFile(noExist)) return yield* missing
        return yield* call({ ref, revision, file }, (fetch) =>
          downloadFileToCacheDir({
            repo: { type: ref.type, name: ref.name },
            path: file,
            revision: commit,
            cacheDir,
            hubUrl: endpoint,
            fetch,
          }),
        ).pipe(
          Effect.tapError((e) =>
            e._tag === "HubFileNotFound"
              ? Effect.promise(async () => {
                  await makeDirectories(path.dirname(noExist)).catch(() => undefined)
                  await fs.writeFile(noExist, "").catch(() => undefined)
                })
              : Effect.void,
          ),
        )
      })

    const resolveFile = (repo: string, file: string, options: ResolveOptions = {}) =>
      Effect.gen(function* () {
        const local = yield* asLocalRepo(repo, options.repoType)
        if (local !== undefined) return yield* local.resolveFile(file)
        const rel = yield* checkRepoPath(repo, file)
        const { ref, revision, storage } = yield* remote(repo, options)
        if (offline) {
          const commit = yield* offlineCommit(ref, revision, rel)
          const pointer = path.join(storage, "snapshots", commit, rel)
          if (yield* isFile(pointer)) return pointer
          if (yield* isFile(path.join(storage, ".no_exist", commit, rel)))
            return yield* new HubFileNotFound({
              repo,
              repoType: ref.type,
              revision,
              file: rel,
              source: cacheDir,
            })
          return yield* notCached(ref, revision, rel)
        }
        const commit = yield* commitFor(ref, revision)
        return yield* download(ref, revision, commit, rel)
      })

    const snapshot = (repo: string, options: SnapshotOptions = {}) =>
      Effect.gen(function* () {
        const local = yield* asLocalRepo(repo, options.repoType)
        if (local !== undefined) return yield* local.snapshot
        const { ref, revision, storage } = yield* remote(repo, options)
        if (offline) {
          // As snapshot_download offline: the cached snapshot as it is, possibly partial.
          const commit = yield* offlineCommit(ref, revision)
          const dir = path.join(storage, "snapshots", commit)
          if (yield* isDirectory(dir)) return dir
          return yield* notCached(ref, revision)
        }
        const commit = yield* commitFor(ref, revision)
        const dir = path.join(storage, "snapshots", commit)
        const keep = patternFilter(options)
        const files = (yield* tree(ref, revision, commit)).filter((e) => e.type === "file" && keep(e.path))
        for (const f of files) yield* checkRepoPath(repo, f.path)
        // Files with one content share one blob; downloading those one after another avoids two
        // writers on one `.incomplete` file.
        const byBlob = new Map<string, ListFileEntry[]>()
        for (const f of files) {
          const blob = f.lfs?.oid ?? f.xetHash ?? f.oid ?? f.path
          byBlob.set(blob, [...(byBlob.get(blob) ?? []), f])
        }
        yield* Effect.forEach(
          byBlob.values(),
          (group) => Effect.forEach(group, (f) => download(ref, revision, commit, f.path), { discard: true }),
          { concurrency, discard: true },
        )
        yield* fsTry(dir, () => makeDirectories(dir))
        return dir
      })

    const listFiles = (repo: string, options: ResolveOptions = {}) =>
      Effect.gen(function* () {
        const local = yield* asLocalRepo(repo, options.repoType)
        if (local !== undefined) return yield* local.listFiles
        const { ref, revision, storage } = yield* remote(repo, options)
        if (offline) {
          const dir = path.join(storage, "snapshots", yield* offlineCommit(ref, revision))
          if (!(yield* isDirectory(dir))) return yield* notCached(ref, revision)
          return yield* walkFiles(dir)
        }
        const commit = yield* commitFor(ref, revision)
        const entries = yield* tree(ref, revision, commit)
        return entries
          .filter((e) => e.type === "file")
          .map((e) => e.path)
          .sort()
      })

    return Hub.of({ resolveFile, snapshot, listFiles })
  })
