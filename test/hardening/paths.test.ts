/**
 * File names from outside (a safetensors index, a Hub repository, a checkpoint manifest, a
 * dataset) never reach outside their directory: for each source, `..`, an absolute path and a
 * symbolic link are tried, and each gives a typed error with nothing outside read or written.
 * "Nothing read" is shown by a bait outside the directory that would load successfully, and
 * "nothing written" by comparing a listing of the outside directory before and after.
 */
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Cause, Effect, Exit, Layer } from "effect"
import { afterAll, describe, expect, it } from "vitest"
import { fromHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { Checkpointer } from "../../src/layers/Checkpointer.ts"
import { openDataset } from "../../src/layers/Dataset.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"
import { checkDataPath } from "../../src/layers/data/files.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { openModelWeights } from "../../src/layers/SafetensorsFile.ts"
import { loadTokenizer } from "../../src/layers/Tokenizer.ts"
import { fixtures, mesh } from "../helpers.ts"

const base = mkdtempSync(join(tmpdir(), "magix-paths-"))
afterAll(() => rmSync(base, { recursive: true, force: true }))

/** A directory outside every repository, holding valid bait files a reader would happily load. */
const outside = join(base, "outside")
mkdirSync(outside)
const fixtureModel = join(fixtures, "hf", "llama")
writeFileSync(join(outside, "bait.safetensors"), readFileSync(join(fixtureModel, "model.safetensors")))
writeFileSync(join(outside, "config.json"), readFileSync(join(fixtureModel, "config.json")))
writeFileSync(
  join(outside, "tokenizer.json"),
  readFileSync(join(fixtures, "tokenizer", "bpe", "tokenizer.json")),
)
writeFileSync(join(outside, "train.jsonl"), '{"text": "secret"}\n')
const listing = (dir: string): string[] =>
  readdirSync(dir, { recursive: true, withFileTypes: false }).map(String).sort()
const outsideBefore = listing(outside)

/** The failure's tag, failing the test on success or a defect. */
const tagOf = async <A, E extends { readonly _tag: string }>(
  effect: Effect.Effect<A, E>,
): Promise<string> => {
  const exit = await Effect.runPromiseExit(effect)
  if (Exit.isSuccess(exit)) throw new Error("expected a typed failure, got success")
  const e = Cause.findErrorOption(exit.cause)
  if (e._tag === "None" || Cause.hasDies(exit.cause))
    throw new Error(`not a typed failure: ${Cause.pretty(exit.cause)}`)
  return e.value._tag
}

let n = 0
const freshDir = (name: string) => {
  const d = join(base, `${name}-${n++}`)
  mkdirSync(d, { recursive: true })
  return d
}

describe("a safetensors index", () => {
  const modelWith = (weightMap: Record<string, string>, setup?: (dir: string) => void) => {
    const dir = freshDir("model")
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ weight_map: weightMap }))
    setup?.(dir)
    return dir
  }
  const open = (dir: string) =>
    Effect.scoped(Effect.flatMap(openModelWeights(dir), (w) => w.readTensor(w.names[0]!)))

  it('may not name a file through ".."', async () => {
    expect(await tagOf(open(modelWith({ "model.norm.weight": "../outside/bait.safetensors" })))).toBe(
      "UnsafeIndexPath",
    )
  })
  it("may not name an absolute path", async () => {
    const abs = join(outside, "bait.safetensors")
    expect(await tagOf(open(modelWith({ "model.norm.weight": abs })))).toBe("UnsafeIndexPath")
  })
  it("may not name a link that leads outside", async () => {
    const dir = modelWith({ "model.norm.weight": "shard.safetensors" }, (d) =>
      symlinkSync(join(outside, "bait.safetensors"), join(d, "shard.safetensors")),
    )
    expect(await tagOf(open(dir))).toBe("UnsafeIndexPath")
  })
  it("may not be a single model.safetensors that links outside", async () => {
    const dir = freshDir("single")
    symlinkSync(join(outside, "bait.safetensors"), join(dir, "model.safetensors"))
    expect(await tagOf(open(dir))).toBe("UnsafeIndexPath")
  })
})

describe("Hub repository file names", () => {
  const repoRoot = freshDir("hub")
  const repo = join(repoRoot, "org", "model")
  mkdirSync(repo, { recursive: true })
  writeFileSync(join(repo, "config.json"), "{}")
  symlinkSync(join(outside, "tokenizer.json"), join(repo, "tokenizer.json"))
  symlinkSync(outside, join(repo, "linked-dir"))
  // A link to the repository itself: listing must not walk it forever.
  symlinkSync(repo, join(repo, "loop"))
  symlinkSync(repo, join(repo, "loop2"))
  const hub = Hub.localDirectory(repoRoot)
  const resolve = (file: string) =>
    Effect.gen(function* () {
      return yield* (yield* Hub).resolveFile("org/model", file)
    }).pipe(Effect.provide(hub))

  it('refuse ".." and absolute paths', async () => {
    expect(await tagOf(resolve("../../outside/config.json"))).toBe("HubUnsafePath")
    expect(await tagOf(resolve("a/../../x"))).toBe("HubUnsafePath")
    expect(await tagOf(resolve(join(outside, "config.json")))).toBe("HubUnsafePath")
  })
  it("refuse a file, or a directory, that links outside the repository", async () => {
    expect(await tagOf(resolve("tokenizer.json"))).toBe("HubUnsafePath")
    expect(await tagOf(resolve("linked-dir/config.json"))).toBe("HubUnsafePath")
    // so a tokenizer behind such a link is never read
    const tok = loadTokenizer("org/model").pipe(Effect.provide(hub))
    expect(await tagOf(tok)).toBe("HubUnsafePath")
  })
  it("are listed once each even with links back into the repository", async () => {
    const files = await Effect.runPromise(
      Effect.gen(function* () {
        return yield* (yield* Hub).listFiles("org/model")
      }).pipe(Effect.provide(hub)),
    )
    expect(files.filter((f) => f.endsWith("config.json")).length).toBeLessThan(10)
  })
  it("given in memory, may not be written outside its temporary directory", async () => {
    for (const name of ["../escape.txt", "/tmp/escape.txt", "a/../../escape.txt"]) {
      const layer = Hub.memory({ "org/m": { [name]: "x" } })
      const exit = await Effect.runPromiseExit(Effect.void.pipe(Effect.provide(layer)))
      expect(Exit.isFailure(exit), name).toBe(true)
    }
    expect(listing(outside)).toEqual(outsideBefore)
  })
})

describe("checkpoint names", () => {
  const run = <A, E>(dir: string, effect: Effect.Effect<A, E, Checkpointer | Devices>) =>
    effect.pipe(
      Effect.provide(Checkpointer.layer({ directory: dir })),
      Effect.scoped,
      Effect.provide(Layer.mergeAll(CpuRuntime({ devices: 2 }))),
    )
  const m = mesh([2], ["data"])
  const array = Effect.gen(function* () {
    const { engine } = yield* Devices
    return yield* fromHost(
      engine,
      Float32Array.of(1, 2, 3, 4),
      [4],
      "float32",
      new NamedSharding(m, P("data")),
    )
  })
  const target = { shape: [4], dtype: "float32" as const, sharding: new NamedSharding(m, P("data")) }

  it('refuse ".." , absolute and separator-holding item and leaf names on save, writing nothing', async () => {
    for (const [item, leaf] of [
      ["..", "w"],
      ["params", ".."],
      ["params", "../../outside/w"],
      ["params", join(outside, "w")],
      ["/abs", "w"],
    ] as const) {
      const dir = freshDir("ckpt-save")
      const save = Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        yield* ckpt.save(1, { [item]: { [leaf]: yield* array } })
        yield* ckpt.wait
      })
      expect(await tagOf(run(dir, save)), `${item}/${leaf}`).toBe("UnsafeCheckpointPath")
      expect(
        readdirSync(dir).filter((f) => !f.startsWith(".")),
        `${item}/${leaf}`,
      ).toEqual([])
    }
    expect(listing(outside)).toEqual(outsideBefore)
  })

  const saved = async () => {
    const dir = freshDir("ckpt")
    await Effect.runPromise(
      run(
        dir,
        Effect.gen(function* () {
          const ckpt = yield* Checkpointer
          yield* ckpt.save(1, { params: { w: yield* array } })
          yield* ckpt.wait
        }),
      ),
    )
    return dir
  }
  const restore = (dir: string, item: string, leaf: string) =>
    run(
      dir,
      Effect.gen(function* () {
        return yield* (yield* Checkpointer).restore(1, { [item]: { [leaf]: target } })
      }),
    )

  it('refuse ".." and absolute names on restore', async () => {
    const dir = await saved()
    expect(await tagOf(restore(dir, "..", "w"))).toBe("UnsafeCheckpointPath")
    expect(await tagOf(restore(dir, "params", "../../../outside"))).toBe("UnsafeCheckpointPath")
    expect(await tagOf(restore(dir, "params", outside))).toBe("UnsafeCheckpointPath")
  })

  it("refuse a manifest that lists a path leaving the step", async () => {
    for (const path of ["../../outside/w", "/abs/w", "params/../../w", "params/w/../../.."]) {
      const dir = await saved()
      const file = join(dir, "1", "manifest.json")
      const manifest = JSON.parse(readFileSync(file, "utf8"))
      manifest.arrays[0].path = path
      writeFileSync(file, JSON.stringify(manifest))
      expect(await tagOf(restore(dir, "params", "w")), path).toBe("CheckpointCorrupt")
    }
  })

  it("refuse an array folder or a chunk that is a link", async () => {
    const dir = await saved()
    const arrayDir = join(dir, "1", "params", "w")
    const moved = join(outside, `w-${n++}`)
    mkdirSync(moved)
    rmSync(arrayDir, { recursive: true })
    symlinkSync(moved, arrayDir)
    expect(await tagOf(restore(dir, "params", "w"))).toBe("CheckpointCorrupt")
    const dir2 = await saved()
    const chunk = join(dir2, "1", "params", "w", "c", "0")
    writeFileSync(join(outside, `chunk-${n}`), readFileSync(chunk))
    rmSync(chunk)
    symlinkSync(join(outside, `chunk-${n}`), chunk)
    expect(await tagOf(restore(dir2, "params", "w"))).toBe("CheckpointCorrupt")
  })
})

describe("dataset file references", () => {
  it('refuse "..", absolute paths and links outside the repository', async () => {
    const repo = freshDir("dataset")
    const tag = async (rel: string, resolved: string) => {
      try {
        await checkDataPath("org/data", rel, resolved)
        return "accepted"
      } catch (e) {
        return (e as { _tag?: string })._tag ?? String(e)
      }
    }
    expect(await tag("../outside/train.jsonl", join(repo, "..", "outside", "train.jsonl"))).toBe(
      "DatasetUnsafePath",
    )
    expect(await tag(join(outside, "train.jsonl"), join(outside, "train.jsonl"))).toBe("DatasetUnsafePath")
    symlinkSync(join(outside, "train.jsonl"), join(repo, "train.jsonl"))
    expect(await tag("train.jsonl", join(repo, "train.jsonl"))).toBe("DatasetUnsafePath")
  })

  it("a dataset repository whose data file or folder links outside is refused before it is read", async () => {
    const root = freshDir("datasets")
    const repo = join(root, "org", "data")
    mkdirSync(repo, { recursive: true })
    symlinkSync(outside, join(repo, "data"))
    const open = openDataset({ path: "org/data" }).pipe(Effect.provide(Hub.localDirectory(root)))
    expect(["DatasetUnsafePath", "HubUnsafePath"]).toContain(await tagOf(open))
    const repo2 = join(root, "org", "data2")
    mkdirSync(repo2, { recursive: true })
    symlinkSync(join(outside, "train.jsonl"), join(repo2, "train.jsonl"))
    const open2 = openDataset({ path: "org/data2" }).pipe(Effect.provide(Hub.localDirectory(root)))
    expect(["DatasetUnsafePath", "HubUnsafePath"]).toContain(await tagOf(open2))
  })
})
