/**
 * The Hub service against a local HTTP server that answers the way huggingface.co's API and file
 * endpoints do, for the requests `@huggingface/hub` makes:
 * - GET  /api/{models,datasets}/{repo}/revision/{rev}   repo info with `sha`
 * - GET  /api/{models,datasets}/{repo}/tree/{rev}[/dir]  file listing, paginated through `Link`
 * - POST /api/{models,datasets}/{repo}/paths-info/{rev}  per-path oid / lfs / lastCommit
 * - GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}    bytes with `Range`, `ETag`, `X-Repo-Commit`;
 *   LFS files redirect to /cdn/{sha256} with `X-Linked-Etag` and `X-Linked-Size`
 * and errors with `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo).
 */
import { createHash } from "node:crypto"
import * as fs from "node:fs"
import * as http from "node:http"
import type { AddressInfo } from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Cause, Effect, Exit, Layer, Logger } from "effect"
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest"
import {
  fnmatch,
  Hub,
  type HubEnvironment,
  type HubError,
  HubFileNotFound,
  hubSettings,
  type ResolveOptions,
  type SnapshotOptions,
} from "../../src/layers/Hub.ts"

// ---------------------------------------------------------------------------------------------
// A small Hub

type RepoKind = "model" | "dataset"

interface MockRepo {
  readonly type: RepoKind
  readonly name: string
  readonly commit: string
  readonly files: Readonly<Record<string, Buffer>>
  readonly lfs?: ReadonlyArray<string>
  readonly access?: "public" | "gated" | "private"
}

interface Answer {
  readonly status: number
  readonly headers?: Record<string, string>
  readonly body?: string
}

type Reply = Answer & { readonly bytes?: Buffer }

interface Seen {
  readonly method: string
  readonly path: string
  readonly authorization: string | undefined
}

const sha1 = (s: string) => createHash("sha1").update(s).digest("hex")
const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex")
const gitOid = (b: Buffer) => createHash("sha1").update(`blob ${b.length}\0`).update(b).digest("hex")
const VALID_TOKEN = "hf_validtoken0123456789"
const PAGE = 3

class MockHub {
  readonly requests: Seen[] = []
  override: ((req: http.IncomingMessage, url: URL) => Answer | undefined) | undefined
  /** Takes over the socket when it returns true (to cut a transfer short). */
  raw: ((req: http.IncomingMessage, res: http.ServerResponse, url: URL) => boolean) | undefined
  base = ""
  private readonly server: http.Server

  constructor(readonly repos: ReadonlyArray<MockRepo>) {
    this.server = http.createServer((req, res) => {
      const chunks: Buffer[] = []
      req.on("data", (c: Buffer) => chunks.push(c))
      req.on("end", () => this.handle(req, res, Buffer.concat(chunks)))
    })
  }

  start = () =>
    new Promise<void>((resolve) =>
      this.server.listen(0, "127.0.0.1", () => {
        this.base = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`
        resolve()
      }),
    )

  stop = () =>
    new Promise<void>((resolve) => {
      this.server.closeAllConnections()
      this.server.close(() => resolve())
    })

  reset() {
    this.requests.length = 0
    this.override = undefined
    this.raw = undefined
  }

  private find(kind: string, name: string) {
    return this.repos.find((r) => `${r.type}s` === kind && r.name === name)
  }

  private isLfs(repo: MockRepo, file: string) {
    return repo.lfs?.includes(file) ?? false
  }

  private entry(repo: MockRepo, file: string, expand: boolean) {
    const bytes = repo.files[file]!
    const pointer = Buffer.from(
      `version https://git-lfs.github.com/spec/v1\noid sha256:${sha256(bytes)}\nsize ${bytes.length}\n`,
    )
    return {
      type: "file",
      path: file,
      size: bytes.length,
      oid: gitOid(this.isLfs(repo, file) ? pointer : bytes),
      ...(this.isLfs(repo, file)
        ? { lfs: { oid: sha256(bytes), size: bytes.length, pointerSize: pointer.length } }
        : {}),
      ...(expand
        ? { lastCommit: { id: sha1(`older ${file}`), title: "add", date: "2024-01-01T00:00:00Z" } }
        : {}),
    }
  }

  private directories(repo: MockRepo) {
    const dirs = new Set<string>()
    for (const f of Object.keys(repo.files)) {
      const parts = f.split("/")
      for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join("/"))
    }
    return [...dirs]
  }

  private error(status: number, code: string, message: string): Answer {
    return {
      status,
      headers: { "content-type": "application/json", "x-error-code": code, "x-error-message": message },
      body: JSON.stringify({ error: message }),
    }
  }

  /** The Hub's access rules: unknown and private repos are 401 without a good token, gated 401/403. */
  private gate(kind: string, name: string, req: http.IncomingMessage): MockRepo | Answer {
    const authorized = req.headers.authorization === `Bearer ${VALID_TOKEN}`
    const repo = this.find(kind, name)
    if (repo === undefined || (repo.access === "private" && !authorized))
      return this.error(authorized ? 404 : 401, "RepoNotFound", "Repository not found")
    if (repo.access === "gated" && !authorized)
      return this.error(
        req.headers.authorization ? 403 : 401,
        "GatedRepo",
        `Access to model ${name} is restricted and you are not in the authorized list.`,
      )
    return repo
  }

  private revision(repo: MockRepo, rev: string): Answer | undefined {
    return rev === "main" || rev === "v1" || rev === repo.commit
      ? undefined
      : this.error(404, "RevisionNotFound", `Invalid rev id: ${rev}`)
  }

  private route(req: http.IncomingMessage, url: URL, body: Buffer): Reply {
    const p = url.pathname
    const api =
      /^\/api\/(models|datasets)\/([^/]+\/[^/]+)\/(revision|tree|paths-info)\/([^/]+)(?:\/(.*))?$/.exec(p)
    if (api) {
      const [, kind, name, what, revRaw, sub] = api
      const rev = decodeURIComponent(revRaw!)
      const repo = this.gate(kind!, name!, req)
      if ("status" in repo) return repo
      const bad = this.revision(repo, rev)
      if (bad) return bad
      const json = (v: unknown, headers: Record<string, string> = {}): Answer => ({
        status: 200,
        headers: { "content-type": "application/json", ...headers },
        body: JSON.stringify(v),
      })
      if (what === "revision")
        return json({
          _id: sha1(name!).slice(0, 24),
          id: name,
          sha: repo.commit,
          private: repo.access === "private",
          gated: repo.access === "gated" ? "auto" : false,
          downloads: 0,
          likes: 0,
          lastModified: "2024-01-01T00:00:00.000Z",
          siblings: Object.keys(repo.files).map((rfilename) => ({ rfilename })),
        })
      if (what === "tree") {
        const prefix = sub ? `${decodeURIComponent(sub)}/` : ""
        const recursive = url.searchParams.get("recursive") === "true"
        const under = (f: string) =>
          f.startsWith(prefix) && (recursive || !f.slice(prefix.length).includes("/"))
        const all = [
          ...this.directories(repo)
            .filter(under)
            .map((d) => ({ type: "directory", path: d, oid: sha1(d), size: 0 })),
          ...Object.keys(repo.files)
            .filter(under)
            .map((f) => this.entry(repo, f, false)),
        ]
        const cursor = Number(url.searchParams.get("cursor") ?? "0")
        const next = new URL(url)
        next.searchParams.set("cursor", String(cursor + PAGE))
        return json(
          all.slice(cursor, cursor + PAGE),
          cursor + PAGE < all.length
            ? { link: `<${this.base}${next.pathname}${next.search}>; rel="next"` }
            : {},
        )
      }
      if (req.method !== "POST") return { status: 405 }
      const { paths, expand } = JSON.parse(body.toString()) as { paths: string[]; expand?: boolean }
      return json(paths.filter((f) => f in repo.files).map((f) => this.entry(repo, f, expand === true)))
    }
    const resolve = /^\/(datasets\/)?([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(p)
    if (resolve) {
      const [, isDataset, name, revRaw, fileRaw] = resolve
      const repo = this.gate(isDataset ? "datasets" : "models", name!, req)
      if ("status" in repo) return repo
      const bad = this.revision(repo, decodeURIComponent(revRaw!))
      if (bad) return bad
      const file = decodeURIComponent(fileRaw!)
      const bytes = repo.files[file]
      if (bytes === undefined) return this.error(404, "EntryNotFound", `${file} does not exist on "main"`)
      const common = { "x-repo-commit": repo.commit, etag: `"${this.entry(repo, file, false).oid}"` }
      if (this.isLfs(repo, file))
        return {
          status: 302,
          headers: {
            ...common,
            location: `${this.base}/cdn/${sha256(bytes)}`,
            "x-linked-etag": `"${sha256(bytes)}"`,
            "x-linked-size": String(bytes.length),
          },
        }
      return { status: 200, headers: common, bytes }
    }
    const cdn = /^\/cdn\/([0-9a-f]{64})$/.exec(p)
    if (cdn) {
      for (const r of this.repos)
        for (const b of Object.values(r.files))
          if (sha256(b) === cdn[1]) return { status: 200, headers: { etag: `"${cdn[1]}"` }, bytes: b }
    }
    return { status: 404, body: "Not Found" }
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse, body: Buffer) {
    const url = new URL(req.url ?? "/", this.base)
    this.requests.push({
      method: req.method ?? "",
      path: url.pathname,
      authorization: req.headers.authorization,
    })
    if (this.raw?.(req, res, url)) return
    const answer: Reply = this.override?.(req, url) ?? this.route(req, url, body)
    const headers = { ...answer.headers }
    const bytes = answer.bytes
    if (bytes !== undefined) {
      const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "")
      headers["accept-ranges"] = "bytes"
      headers["content-type"] = "application/octet-stream"
      if (range) {
        const start = Number(range[1])
        const end = range[2] ? Math.min(Number(range[2]), bytes.length - 1) : bytes.length - 1
        headers["content-range"] = `bytes ${start}-${end}/${bytes.length}`
        res.writeHead(206, headers)
        res.end(req.method === "HEAD" ? undefined : bytes.subarray(start, end + 1))
      } else {
        res.writeHead(200, { ...headers, "content-length": String(bytes.length) })
        res.end(req.method === "HEAD" ? undefined : bytes)
      }
      return
    }
    res.writeHead(answer.status, headers)
    res.end(req.method === "HEAD" ? undefined : answer.body)
  }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

const weights = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 37) % 256))
const tiny: MockRepo = {
  type: "model",
  name: "acme/tiny",
  commit: sha1("tiny"),
  files: {
    "config.json": Buffer.from(JSON.stringify({ model_type: "llama", hidden_size: 64 })),
    "tokenizer.json": Buffer.from('{"version":"1.0"}'),
    "model.safetensors": weights,
    "nested/deeper/notes.txt": Buffer.from("hello from a subdirectory"),
    "README.md": Buffer.from("# tiny"),
  },
  lfs: ["model.safetensors"],
}
const corpus: MockRepo = {
  type: "dataset",
  name: "acme/corpus",
  commit: sha1("corpus"),
  files: {
    "data/train.jsonl": Buffer.from('{"text":"a"}\n{"text":"b"}\n'),
    "README.md": Buffer.from("# corpus"),
  },
}
const gated: MockRepo = {
  type: "model",
  name: "acme/gated",
  commit: sha1("gated"),
  files: { "config.json": Buffer.from("{}") },
  access: "gated",
}
const evil: MockRepo = {
  type: "model",
  name: "acme/evil",
  commit: sha1("evil"),
  files: { "ok.txt": Buffer.from("fine"), "../escape.txt": Buffer.from("gotcha") },
}

const mock = new MockHub([tiny, corpus, gated, evil])
const temps: string[] = []
const tempDir = () => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), "magix-hub-test-"))
  temps.push(d)
  return d
}

beforeAll(() => mock.start())
afterAll(async () => {
  await mock.stop()
  for (const d of temps) fs.rmSync(d, { recursive: true, force: true })
})
afterEach(() => mock.reset())

const envFor = (home: string, extra: HubEnvironment = {}): HubEnvironment => ({
  HF_HOME: home,
  HF_ENDPOINT: mock.base,
  ...extra,
})
const fast = { maxRetries: 2, retryDelay: "1 millis" } as const
const remote = (env: HubEnvironment) => Hub.layerWith(env, fast)

const run = <A, E, E2>(effect: Effect.Effect<A, E, Hub>, layer: Layer.Layer<Hub, E2>) =>
  Effect.runPromise(effect.pipe(Effect.provide(layer)))
const failure = <A, E, E2>(effect: Effect.Effect<A, E, Hub>, layer: Layer.Layer<Hub, E2>) =>
  Effect.runPromise(Effect.flip(effect).pipe(Effect.provide(layer)))

const resolve = (repo: string, file: string, options?: ResolveOptions) =>
  Effect.gen(function* () {
    return yield* (yield* Hub).resolveFile(repo, file, options)
  })
const snapshot = (repo: string, options?: SnapshotOptions) =>
  Effect.gen(function* () {
    return yield* (yield* Hub).snapshot(repo, options)
  })
const list = (repo: string, options?: ResolveOptions) =>
  Effect.gen(function* () {
    return yield* (yield* Hub).listFiles(repo, options)
  })

const read = (p: string) => fs.readFileSync(p)
const walk = (dir: string): string[] =>
  fs
    .readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() || e.isSymbolicLink())
    .map((e) => path.relative(dir, path.join(e.parentPath, e.name)))
    .sort()

// ---------------------------------------------------------------------------------------------

describe("Hub.layer: downloads into the standard Hugging Face cache", () => {
  it("resolveFile fills blobs/, snapshots/<commit>/ and refs/main; a second resolve sends nothing", async () => {
    const home = tempDir()
    const storage = path.join(home, "hub", "models--acme--tiny")
    const { config, weightsPath, nested, before, after } = await run(
      Effect.gen(function* () {
        const config = yield* resolve("acme/tiny", "config.json")
        const weightsPath = yield* resolve("acme/tiny", "model.safetensors")
        const nested = yield* resolve("acme/tiny", "nested/deeper/notes.txt")
        const before = mock.requests.length
        expect(yield* resolve("acme/tiny", "config.json")).toBe(config)
        expect(yield* resolve("acme/tiny", "model.safetensors")).toBe(weightsPath)
        return { config, weightsPath, nested, before, after: mock.requests.length }
      }),
      remote(envFor(home)),
    )
    expect(after).toBe(before)
    expect(config).toBe(path.join(storage, "snapshots", tiny.commit, "config.json"))
    expect(read(config)).toEqual(tiny.files["config.json"])
    expect(read(weightsPath)).toEqual(weights)
    expect(read(nested).toString()).toBe("hello from a subdirectory")
    expect(fs.readFileSync(path.join(storage, "refs", "main"), "utf8")).toBe(tiny.commit)
    // Snapshots are relative symlinks into blobs/, named by git oid, or sha256 for LFS files.
    expect(fs.lstatSync(config).isSymbolicLink()).toBe(true)
    expect(fs.readlinkSync(config)).toBe(path.join("..", "..", "blobs", gitOid(tiny.files["config.json"]!)))
    expect(fs.readlinkSync(weightsPath)).toBe(path.join("..", "..", "blobs", sha256(weights)))
    expect(read(path.join(storage, "blobs", sha256(weights)))).toEqual(weights)
    expect(fs.readdirSync(path.join(storage, "blobs")).some((b) => b.endsWith(".incomplete"))).toBe(false)
    // What the library asked for, in the Hub's own URL scheme.
    const paths = new Set(mock.requests.map((r) => `${r.method} ${r.path}`))
    expect(paths).toContain("GET /api/models/acme/tiny/revision/main")
    expect(paths).toContain(`POST /api/models/acme/tiny/paths-info/${tiny.commit}`)
    expect(paths).toContain(`GET /acme/tiny/resolve/${tiny.commit}/config.json`)
    expect(paths).toContain(`GET /cdn/${sha256(weights)}`)
    expect(mock.requests.every((r) => r.authorization === undefined)).toBe(true)
  })

  it("a new process with a filled cache asks only which commit main is", async () => {
    const home = tempDir()
    await run(resolve("acme/tiny", "config.json"), remote(envFor(home)))
    mock.reset()
    const again = await run(resolve("acme/tiny", "config.json"), remote(envFor(home)))
    expect(read(again)).toEqual(tiny.files["config.json"])
    expect(mock.requests.map((r) => r.path)).toEqual(["/api/models/acme/tiny/revision/main"])
    mock.reset()
    // By commit, nothing at all.
    await run(resolve("acme/tiny", "config.json", { revision: tiny.commit }), remote(envFor(home)))
    expect(mock.requests).toEqual([])
  })

  it("snapshot honours allowPatterns, follows the tree's pagination, and is reused", async () => {
    const home = tempDir()
    const { partial, full, requestsForSecond } = await run(
      Effect.gen(function* () {
        const partial = yield* snapshot("acme/tiny", { allowPatterns: ["*.json"] })
        const partialFiles = walk(partial)
        const full = yield* snapshot("acme/tiny")
        const before = mock.requests.length
        yield* snapshot("acme/tiny")
        return { partial: partialFiles, full, requestsForSecond: mock.requests.length - before }
      }),
      remote(envFor(home)),
    )
    expect(partial).toEqual(["config.json", "tokenizer.json"])
    expect(full).toBe(path.join(home, "hub", "models--acme--tiny", "snapshots", tiny.commit))
    expect(walk(full)).toEqual(Object.keys(tiny.files).sort())
    for (const [f, bytes] of Object.entries(tiny.files)) expect(read(path.join(full, f))).toEqual(bytes)
    expect(requestsForSecond).toBe(0)
    expect(mock.requests.some((r) => r.path.includes("/tree/"))).toBe(true)
  })

  it("listFiles lists every file of the revision, sorted", async () => {
    const files = await run(list("acme/tiny"), remote(envFor(tempDir())))
    expect(files).toEqual(Object.keys(tiny.files).sort())
  })

  it("a dataset repo lives under datasets--org--name and uses the datasets endpoints", async () => {
    const home = tempDir()
    const { file, viaPrefix, files } = await run(
      Effect.gen(function* () {
        const file = yield* resolve("acme/corpus", "data/train.jsonl", { repoType: "dataset" })
        const viaPrefix = yield* resolve("datasets/acme/corpus", "README.md")
        const files = yield* list("acme/corpus", { repoType: "dataset" })
        return { file, viaPrefix, files }
      }),
      remote(envFor(home)),
    )
    const storage = path.join(home, "hub", "datasets--acme--corpus")
    expect(file).toBe(path.join(storage, "snapshots", corpus.commit, "data", "train.jsonl"))
    expect(read(file)).toEqual(corpus.files["data/train.jsonl"])
    expect(read(viaPrefix).toString()).toBe("# corpus")
    expect(files).toEqual(["README.md", "data/train.jsonl"])
    expect(fs.readFileSync(path.join(storage, "refs", "main"), "utf8")).toBe(corpus.commit)
    const paths = mock.requests.map((r) => r.path)
    expect(paths).toContain("/api/datasets/acme/corpus/revision/main")
    expect(paths).toContain(`/datasets/acme/corpus/resolve/${corpus.commit}/data/train.jsonl`)
  })

  it("HF_HUB_CACHE wins over HF_HOME, and HF_ENDPOINT may end with a slash", async () => {
    const home = tempDir()
    const cache = path.join(tempDir(), "elsewhere")
    const p = await run(
      resolve("acme/tiny", "tokenizer.json"),
      remote(envFor(home, { HF_HUB_CACHE: cache, HF_ENDPOINT: `${mock.base}/` })),
    )
    expect(p.startsWith(path.join(cache, "models--acme--tiny"))).toBe(true)
    expect(fs.existsSync(path.join(home, "hub"))).toBe(false)
  })

  it("reads its settings as huggingface_hub does", () => {
    const s = hubSettings({ HF_HOME: "/h" })
    expect(s.cacheDir).toBe(path.resolve("/h/hub"))
    expect(s.endpoint).toBe("https://huggingface.co")
    expect(s.tokenPath).toBe("/h/token")
    expect(s.token).toBeUndefined()
    expect(hubSettings({ XDG_CACHE_HOME: "/x" }).cacheDir).toBe(path.resolve("/x/huggingface/hub"))
    expect(hubSettings({}).cacheDir).toBe(path.join(os.homedir(), ".cache", "huggingface", "hub"))
    for (const v of ["1", "true", "YES", "on", " True "])
      expect(hubSettings({ HF_HUB_OFFLINE: v }).offline).toBe(true)
    for (const v of ["0", "false", "", "no", undefined])
      expect(hubSettings({ HF_HUB_OFFLINE: v }).offline).toBe(false)
    expect(hubSettings({ TRANSFORMERS_OFFLINE: "1" }).offline).toBe(true)
    expect(String(hubSettings({ HF_TOKEN: VALID_TOKEN }).token)).not.toContain(VALID_TOKEN)
  })
})

describe("Hub.layer offline", () => {
  it("HF_HUB_OFFLINE=1 resolves from the cache with no request, and fails typed for an uncached file", async () => {
    const home = tempDir()
    const online = await run(resolve("acme/tiny", "config.json"), remote(envFor(home)))
    mock.reset()
    const offline = remote(envFor(home, { HF_HUB_OFFLINE: "1" }))
    const { p, files, snap } = await run(
      Effect.gen(function* () {
        const p = yield* resolve("acme/tiny", "config.json")
        const files = yield* list("acme/tiny")
        const snap = yield* snapshot("acme/tiny")
        return { p, files, snap }
      }),
      offline,
    )
    expect(p).toBe(online)
    expect(files).toEqual(["config.json"])
    expect(snap).toBe(path.dirname(online))
    const missing = await failure(resolve("acme/tiny", "tokenizer.json"), offline)
    expect(missing._tag).toBe("HubNotCached")
    expect(missing.message).toContain("tokenizer.json")
    expect(missing.message).toContain("acme/tiny")
    expect(missing.message).toContain("HF_HUB_OFFLINE")
    expect((await failure(resolve("acme/other", "config.json"), offline))._tag).toBe("HubNotCached")
    expect((await failure(snapshot("acme/other"), offline))._tag).toBe("HubNotCached")
    expect(mock.requests).toEqual([])
  })

  it("reuses a cache laid out by Python tools, offline and online", async () => {
    const cache = path.join(tempDir(), "hub")
    const commit = tiny.commit
    const content = Buffer.from('{"written_by":"python"}')
    const etag = gitOid(content)
    const storage = path.join(cache, "models--acme--tiny")
    fs.mkdirSync(path.join(storage, "blobs"), { recursive: true })
    fs.mkdirSync(path.join(storage, "snapshots", commit), { recursive: true })
    fs.mkdirSync(path.join(storage, "refs"), { recursive: true })
    fs.writeFileSync(path.join(storage, "blobs", etag), content)
    fs.symlinkSync(
      path.join("..", "..", "blobs", etag),
      path.join(storage, "snapshots", commit, "config.json"),
    )
    fs.writeFileSync(path.join(storage, "refs", "main"), commit)
    const env = { HF_HUB_CACHE: cache, HF_HOME: tempDir(), HF_ENDPOINT: mock.base }

    const offline = await run(resolve("acme/tiny", "config.json"), remote({ ...env, HF_HUB_OFFLINE: "1" }))
    expect(offline).toBe(path.join(storage, "snapshots", commit, "config.json"))
    expect(read(offline)).toEqual(content)
    expect(mock.requests).toEqual([])

    const online = await run(resolve("acme/tiny", "config.json"), remote(env))
    expect(read(online)).toEqual(content)
    expect(mock.requests.map((r) => r.path)).toEqual(["/api/models/acme/tiny/revision/main"])
  })

  it("falls back to the cache when the Hub fails, as huggingface_hub does", async () => {
    const home = tempDir()
    await run(resolve("acme/tiny", "config.json"), remote(envFor(home)))
    mock.override = () => ({ status: 503, body: "down" })
    const p = await run(resolve("acme/tiny", "config.json"), remote(envFor(home)))
    expect(read(p)).toEqual(tiny.files["config.json"])
  })
})

describe("Hub.layer errors", () => {
  it("an unknown repo, revision or file is its own typed error, and a missing file is remembered", async () => {
    const home = tempDir()
    const layer = remote(envFor(home))
    const repo = await failure(resolve("acme/missing", "config.json"), layer)
    expect(repo._tag).toBe("HubRepoNotFound")
    expect(repo.message).toContain("acme/missing")
    expect(repo.message).toContain("HF_TOKEN")
    const repoWithToken = await failure(
      resolve("acme/missing", "config.json"),
      remote(envFor(home, { HF_TOKEN: VALID_TOKEN })),
    )
    expect(repoWithToken._tag).toBe("HubRepoNotFound")
    const revision = await failure(resolve("acme/tiny", "config.json", { revision: "v9" }), layer)
    expect(revision._tag).toBe("HubRevisionNotFound")
    expect(revision.message).toContain('"v9"')

    const { file, again, requests } = await run(
      Effect.gen(function* () {
        const file = yield* Effect.flip(resolve("acme/tiny", "nope.json"))
        const before = mock.requests.length
        const again = yield* Effect.flip(resolve("acme/tiny", "nope.json"))
        return { file, again, requests: mock.requests.length - before }
      }),
      layer,
    )
    expect(file).toBeInstanceOf(HubFileNotFound)
    expect(file.message).toContain("nope.json")
    expect(file.message).toContain("acme/tiny")
    expect(again._tag).toBe("HubFileNotFound")
    expect(requests).toBe(0)
    expect(
      fs.existsSync(path.join(home, "hub", "models--acme--tiny", ".no_exist", tiny.commit, "nope.json")),
    ).toBe(true)
    // The resolve endpoint's own 404 (EntryNotFound) is the same error.
    mock.override = (_req, url) =>
      url.pathname.includes("/resolve/")
        ? {
            status: 404,
            headers: { "x-error-code": "EntryNotFound", "content-type": "application/json" },
            body: JSON.stringify({ error: "Entry not found" }),
          }
        : undefined
    expect((await failure(resolve("acme/tiny", "README.md"), remote(envFor(tempDir()))))._tag).toBe(
      "HubFileNotFound",
    )
  })

  it("a gated repo asks for HF_TOKEN and the license; the token is sent as a Bearer header", async () => {
    const denied = await failure(resolve("acme/gated", "config.json"), remote(envFor(tempDir())))
    expect(denied._tag).toBe("HubAccessDenied")
    if (denied._tag !== "HubAccessDenied") return
    expect(denied.status).toBe(401)
    expect(denied.gated).toBe(true)
    expect(denied.message).toContain("HF_TOKEN")
    expect(denied.message).toContain("license")
    expect(denied.message).toContain(`${mock.base}/acme/gated`)

    mock.reset()
    const p = await run(
      resolve("acme/gated", "config.json"),
      remote(envFor(tempDir(), { HF_TOKEN: VALID_TOKEN })),
    )
    expect(read(p).toString()).toBe("{}")
    expect(mock.requests.length).toBeGreaterThan(0)
    expect(mock.requests.every((r) => r.authorization === `Bearer ${VALID_TOKEN}`)).toBe(true)
  })

  it("a token without the hf_ prefix is sent too (the library alone would refuse it)", async () => {
    const token = "plain-secret-token-42"
    const err = await failure(
      resolve("acme/gated", "config.json"),
      remote(envFor(tempDir(), { HF_TOKEN: token })),
    )
    expect(err._tag).toBe("HubAccessDenied")
    if (err._tag === "HubAccessDenied") expect(err.status).toBe(403)
    expect(mock.requests[0]?.authorization).toBe(`Bearer ${token}`)
    expect(JSON.stringify(err)).not.toContain(token)
    expect(err.message).not.toContain(token)
  })

  it("reads the token file that `hf auth login` writes when HF_TOKEN is not set", async () => {
    const home = tempDir()
    fs.writeFileSync(path.join(home, "token"), `${VALID_TOKEN}\n`)
    await run(resolve("acme/gated", "config.json"), remote(envFor(home)))
    expect(mock.requests[0]?.authorization).toBe(`Bearer ${VALID_TOKEN}`)
  })

  const secret = "hf_SuperSecretToken987654321"
  const expectNoSecret = (error: HubError, where: string) => {
    for (const text of [
      JSON.stringify(error),
      String(error),
      error.message,
      ...Object.values(error).map(String),
    ])
      expect(text, where).not.toContain(secret)
  }
  const echo =
    (status: number, only?: string) =>
    (req: http.IncomingMessage, url: URL): Answer | undefined =>
      only === undefined || url.pathname.includes(only)
        ? {
            status,
            headers: {
              "content-type": "application/json",
              "x-error-message": `rejected ${req.headers.authorization}`,
            },
            body: JSON.stringify({ error: `bad credentials: ${req.headers.authorization}`, token: secret }),
          }
        : undefined

  for (const [status, tag] of [
    [401, "HubAccessDenied"],
    [403, "HubAccessDenied"],
    [404, "HubRepoNotFound"],
    [500, "HubRequestFailed"],
  ] as const) {
    it(`HF_TOKEN never appears in the error of an HTTP ${status}, even when the server echoes it`, async () => {
      const logged: unknown[] = []
      const spies = (["log", "debug", "info", "warn", "error"] as const).map((m) =>
        vi.spyOn(console, m).mockImplementation((...args: unknown[]) => void logged.push(args)),
      )
      const capture = Logger.layer([Logger.make((o) => void logged.push(o.message, Cause.pretty(o.cause)))])
      try {
        for (const only of [undefined, "/paths-info/", "/resolve/"]) {
          mock.reset()
          mock.override = echo(status, only)
          const layer = remote(envFor(tempDir(), { HF_TOKEN: secret }))
          const exit = await Effect.runPromise(
            Effect.exit(resolve("acme/tiny", "config.json")).pipe(
              Effect.provide(Layer.merge(layer, capture)),
            ),
          )
          expect(Exit.isFailure(exit)).toBe(true)
          if (!Exit.isFailure(exit)) return
          expect(Cause.pretty(exit.cause)).not.toContain(secret)
          const error = Cause.findErrorOption(exit.cause)
          expect(error._tag).toBe("Some")
          if (error._tag !== "Some") return
          expect(error.value._tag).toBe(status === 404 && only === "/resolve/" ? "HubFileNotFound" : tag)
          expectNoSecret(error.value, `${status} on ${only ?? "every request"}`)
          expect(mock.requests.some((r) => r.authorization === `Bearer ${secret}`)).toBe(true)
          if (status === 500 && only === undefined) expect(mock.requests.length).toBe(1 + fast.maxRetries)
        }
        // A fallback to the cache logs the failure: that line is scrubbed too.
        mock.reset()
        const home = tempDir()
        await run(resolve("acme/tiny", "config.json"), remote(envFor(home, { HF_TOKEN: secret })))
        mock.override = echo(status)
        await Effect.runPromise(
          resolve("acme/tiny", "config.json").pipe(
            Effect.provide(Layer.merge(remote(envFor(home, { HF_TOKEN: secret })), capture)),
          ),
        )
        expect(logged.length).toBeGreaterThan(0)
        expect(JSON.stringify(logged)).not.toContain(secret)
        expect(logged.map(String).join("\n")).not.toContain(secret)
      } finally {
        for (const s of spies) s.mockRestore()
      }
    })
  }

  it("retries 503s with backoff, then succeeds", async () => {
    let failures = 2
    mock.override = () => (failures-- > 0 ? { status: 503, body: "busy" } : undefined)
    const p = await run(resolve("acme/tiny", "README.md"), remote(envFor(tempDir())))
    expect(read(p).toString()).toBe("# tiny")
    expect(mock.requests.filter((r) => r.path === "/api/models/acme/tiny/revision/main").length).toBe(3)
  })

  it("a transfer cut short is a network error and leaves no snapshot file", async () => {
    const home = tempDir()
    mock.raw = (req, res, url) => {
      if (!url.pathname.startsWith("/cdn/") || req.headers.range !== undefined) return false
      res.writeHead(200, {
        "content-length": String(weights.length),
        "content-type": "application/octet-stream",
      })
      res.write(weights.subarray(0, 100))
      setTimeout(() => res.destroy(), 20)
      return true
    }
    const err = await failure(resolve("acme/tiny", "model.safetensors"), remote(envFor(home)))
    expect(err._tag).toBe("HubNetworkError")
    const snap = path.join(home, "hub", "models--acme--tiny", "snapshots", tiny.commit, "model.safetensors")
    expect(fs.existsSync(snap)).toBe(false)
    expect(fs.existsSync(path.join(home, "hub", "models--acme--tiny", "blobs", sha256(weights)))).toBe(false)
    // The next attempt completes it.
    mock.reset()
    expect(read(await run(resolve("acme/tiny", "model.safetensors"), remote(envFor(home))))).toEqual(weights)
  })

  it("an unreachable HF_ENDPOINT is a network error naming it", async () => {
    const closed = http.createServer()
    await new Promise<void>((r) => closed.listen(0, "127.0.0.1", () => r()))
    const endpoint = `http://127.0.0.1:${(closed.address() as AddressInfo).port}`
    await new Promise<void>((r) => closed.close(() => r()))
    const err = await failure(
      resolve("acme/tiny", "config.json"),
      remote(envFor(tempDir(), { HF_ENDPOINT: endpoint, HF_TOKEN: secret })),
    )
    expect(err._tag).toBe("HubNetworkError")
    expect(err.message).toContain(endpoint)
    expect(err.message).toContain("HF_HUB_OFFLINE")
    expectNoSecret(err, "network")
    expect(mock.requests).toEqual([])
  })

  it("refuses paths that would leave the repo or the cache, without a request", async () => {
    const layer = remote(envFor(tempDir()))
    for (const bad of ["../../etc/passwd", "/etc/passwd", "a/../../b", "..", "C:/windows", "x\\..\\..\\y"]) {
      const err = await failure(resolve("acme/tiny", bad), layer)
      expect(err._tag, bad).toBe("HubUnsafePath")
    }
    expect((await failure(resolve("acme/tiny", "config.json", { revision: "../../x" }), layer))._tag).toBe(
      "HubUnsafePath",
    )
    expect((await failure(resolve("acme/a--b", "config.json"), layer))._tag).toBe("HubInvalidRepo")
    expect((await failure(resolve("a/b/c", "config.json"), layer))._tag).toBe("HubInvalidRepo")
    expect(mock.requests).toEqual([])
    // A server whose listing holds such a path.
    const home = tempDir()
    const err = await failure(snapshot("acme/evil"), remote(envFor(home)))
    expect(err._tag).toBe("HubUnsafePath")
    expect(err.message).toContain("../escape.txt")
    expect(fs.existsSync(path.join(home, "hub", "escape.txt"))).toBe(false)
    expect(fs.existsSync(path.join(home, "hub", "models--acme--evil", "snapshots", "escape.txt"))).toBe(false)
  })
})

describe("local directories", () => {
  const makeRepoDir = (root: string) => {
    fs.mkdirSync(path.join(root, "sub"), { recursive: true })
    fs.writeFileSync(path.join(root, "config.json"), '{"local":true}')
    fs.writeFileSync(path.join(root, "sub", "a.txt"), "a")
    fs.mkdirSync(path.join(root, ".git"))
    fs.writeFileSync(path.join(root, ".git", "HEAD"), "ref")
    return root
  }

  it("Hub.layer reads a repo given as a local path directly, absolute or relative", async () => {
    const dir = makeRepoDir(tempDir())
    const relative = path.relative(process.cwd(), dir)
    expect(relative.startsWith("../")).toBe(true)
    const layer = remote(envFor(tempDir()))
    const out = await run(
      Effect.gen(function* () {
        return {
          abs: yield* resolve(dir, "config.json"),
          rel: yield* resolve(relative, "sub/a.txt"),
          files: yield* list(dir),
          snap: yield* snapshot(relative, { allowPatterns: ["*.json"] }),
        }
      }),
      layer,
    )
    expect(out.abs).toBe(path.join(dir, "config.json"))
    expect(out.rel).toBe(path.join(dir, "sub", "a.txt"))
    expect(out.files).toEqual(["config.json", "sub/a.txt"])
    expect(out.snap).toBe(dir)
    const missing = await failure(resolve(dir, "nope.json"), layer)
    expect(missing._tag).toBe("HubFileNotFound")
    expect(missing.message).toContain("nope.json")
    const noDir = await failure(resolve("./no-such-dir-for-magix", "config.json"), layer)
    expect(noDir._tag).toBe("HubRepoNotFound")
    expect(noDir.message).toContain("local directory")
    expect((await failure(resolve(dir, "../escape"), layer))._tag).toBe("HubUnsafePath")
    expect(mock.requests).toEqual([])
  })

  it("a Hugging Face snapshot directory given as a local path lists through its symlinks", async () => {
    const home = tempDir()
    const snap = await run(snapshot("acme/tiny"), remote(envFor(home)))
    const files = await run(list(snap), remote(envFor(home, { HF_HUB_OFFLINE: "1" })))
    expect(files).toEqual(Object.keys(tiny.files).sort())
  })

  it("Hub.localDirectory maps repo ids to subdirectories of its root", async () => {
    const root = tempDir()
    makeRepoDir(path.join(root, "acme", "tiny"))
    const layer = Hub.localDirectory(root)
    const out = await run(
      Effect.gen(function* () {
        return {
          p: yield* resolve("acme/tiny", "sub/a.txt"),
          files: yield* list("acme/tiny"),
          snap: yield* snapshot("acme/tiny"),
        }
      }),
      layer,
    )
    expect(out.p).toBe(path.join(root, "acme", "tiny", "sub", "a.txt"))
    expect(out.files).toEqual(["config.json", "sub/a.txt"])
    expect(out.snap).toBe(path.join(root, "acme", "tiny"))
    const missingFile = await failure(resolve("acme/tiny", "weights.bin"), layer)
    expect(missingFile._tag).toBe("HubFileNotFound")
    expect(missingFile.message).toContain("acme/tiny")
    expect((await failure(resolve("acme/other", "config.json"), layer))._tag).toBe("HubRepoNotFound")
    expect((await failure(resolve("acme/tiny", "../../outside"), layer))._tag).toBe("HubUnsafePath")
  })

  it("Hub.memory materialises files in a temporary directory removed with the layer", async () => {
    const bytes = new Uint8Array([1, 2, 3, 250])
    const layer = Hub.memory({
      "acme/tiny": { "config.json": '{"memory":true}', "weights/w.bin": bytes },
      "acme/corpus": { "data.jsonl": '{"text":"x"}\n' },
    })
    const out = await run(
      Effect.gen(function* () {
        const config = yield* resolve("acme/tiny", "config.json")
        return {
          config,
          text: fs.readFileSync(config, "utf8"),
          weights: new Uint8Array(fs.readFileSync(yield* resolve("acme/tiny", "weights/w.bin"))),
          files: yield* list("acme/tiny"),
          data: fs.readFileSync(yield* resolve("acme/corpus", "data.jsonl", { repoType: "dataset" }), "utf8"),
          missing: yield* Effect.flip(resolve("acme/tiny", "nope")),
        }
      }),
      layer,
    )
    expect(out.text).toBe('{"memory":true}')
    expect(out.weights).toEqual(bytes)
    expect(out.files).toEqual(["config.json", "weights/w.bin"])
    expect(out.data).toBe('{"text":"x"}\n')
    expect(out.missing._tag).toBe("HubFileNotFound")
    expect(fs.existsSync(out.config)).toBe(false)
    const bad = await Effect.runPromise(
      Effect.flip(Layer.build(Hub.memory({ "acme/x": { "../up": "no" } })).pipe(Effect.scoped)),
    )
    expect(bad._tag).toBe("HubUnsafePath")
  })
})

describe("fnmatch", () => {
  it("matches as Python's fnmatch does in allow_patterns", () => {
    expect(fnmatch("*.json").test("config.json")).toBe(true)
    expect(fnmatch("*.json").test("sub/config.json")).toBe(true)
    expect(fnmatch("*.json").test("config.jsonl")).toBe(false)
    expect(fnmatch("model-?????-of-*.safetensors").test("model-00001-of-00002.safetensors")).toBe(true)
    expect(fnmatch("data/").test("data/train.jsonl")).toBe(true)
    expect(fnmatch("[!a]*.txt").test("b.txt")).toBe(true)
    expect(fnmatch("[!a]*.txt").test("a.txt")).toBe(false)
    expect(fnmatch("a+b(c).md").test("a+b(c).md")).toBe(true)
  })
})
