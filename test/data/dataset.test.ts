/**
 * Reading datasets: .jsonl line by line (with typed errors at the right line), .parquet against
 * pyarrow's fixtures (plain and snappy, the list-of-struct `messages` column included), .txt,
 * Hub dataset repositories laid out the ways `datasets` writes them, and paths that try to leave
 * the dataset's directory.
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { Effect, type Layer } from "effect"
import { afterAll, describe, expect, it } from "vitest"
import {
  type DatasetSpec,
  exampleTokens,
  loadExamples,
  loadPrompts,
  openDataset,
  readExamples,
} from "../../src/layers/Dataset.ts"
import { checkDataPath, selectSplitFiles } from "../../src/layers/data/files.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadTokenizer } from "../../src/layers/Tokenizer.ts"

const root = path.join(import.meta.dirname, "..", "..")
const parquetDir = path.join(root, "test", "fixtures", "parquet")
const reference = JSON.parse(fs.readFileSync(path.join(parquetDir, "reference.json"), "utf8")) as {
  id: number[]
  text: string[]
  messages: Array<Array<{ role: string; content: string }>>
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "magix-data-test-"))
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }))
let counter = 0
const write = (name: string, content: string | Uint8Array) => {
  const dir = path.join(tmp, String(counter++))
  const file = path.join(dir, name)
  fs.mkdirSync(path.dirname(file), { recursive: true })
  fs.writeFileSync(file, content)
  return file
}

const noHub = Hub.localDirectory(tmp)
const run = <A, E>(effect: Effect.Effect<A, E, Hub>, layer: Layer.Layer<Hub, unknown> = noHub) =>
  Effect.runPromise(effect.pipe(Effect.provide(layer), Effect.orDie))
const fail = <A, E>(effect: Effect.Effect<A, E, Hub>, layer: Layer.Layer<Hub, unknown> = noHub) =>
  Effect.runPromise(effect.pipe(Effect.flip, Effect.provide(layer), Effect.orDie))

const all = (spec: DatasetSpec, layer?: Layer.Layer<Hub, unknown>) => run(loadExamples(spec), layer)

describe(".jsonl", () => {
  it("reads one example per non-blank line, with CRLF endings and Unicode", async () => {
    const file = write("a.jsonl", '{"text": "one"}\n\n  \r\n{"text": "twö 🙂", "x": 1}\r\n{"text":"three"}')
    expect(await all({ path: file })).toEqual(["one", "twö 🙂", "three"])
    const index = await run(openDataset({ path: file }))
    expect(index.count).toBe(3)
    const rows = await run(readExamples(index, [2, 0]))
    expect(rows.map((r) => r.at.line)).toEqual([5, 1])
  })

  it("reads the tiny example dataset", async () => {
    const examples = await all({ path: path.join(root, "examples", "tiny", "addition.jsonl") })
    expect(examples.length).toBe(100)
    expect(examples[0]).toBe("1+1=2")
  })

  it("indexes lines across read chunks of a file of several MiB", async () => {
    const lines = Array.from({ length: 60_000 }, (_, i) =>
      JSON.stringify({ text: `${i} ${"y".repeat(i % 150)}` }),
    )
    const file = write("big.jsonl", `${lines.join("\n")}\n`)
    const index = await run(openDataset({ path: file }))
    expect(index.count).toBe(60_000)
    const picks = [0, 1, 27_961, 28_000, 45_000, 59_999]
    const rows = await run(readExamples(index, picks))
    expect(rows.map((r) => r.example)).toEqual(picks.map((i) => `${i} ${"y".repeat(i % 150)}`))
    expect(rows.map((r) => r.at.line)).toEqual(picks.map((i) => i + 1))
  })

  it("a malformed line is a typed error with the file and its 1-based line", async () => {
    const file = write("bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    const index = await run(openDataset({ path: file }))
    const e = await Effect.runPromise(Effect.flip(readExamples(index, [1])))
    expect(e._tag).toBe("DatasetParseError")
    expect(e).toMatchObject({ file, line: 3 })
    expect(e.message).toContain(`${file}, line 3`)
    const notObject = write("list.jsonl", "[1, 2]\n")
    expect((await fail(openDataset({ path: notObject })))._tag).toBe("DatasetParseError")
  })

  it("a missing field is a typed error naming the fields there are; checked on opening", async () => {
    const file = write("f.jsonl", '{"content": "a", "id": 1}\n')
    const e = await fail(openDataset({ path: file }))
    expect(e._tag).toBe("DatasetFieldMissing")
    expect(e).toMatchObject({ line: 1, field: "text", available: ["content", "id"] })
    expect(e.message).toContain("--train-data-field")
    expect(await all({ path: file, field: "content" })).toEqual(["a"])
    const later = write("g.jsonl", '{"text": "a"}\n{"body": "b"}\n')
    const index = await run(openDataset({ path: later }))
    const e2 = await Effect.runPromise(Effect.flip(readExamples(index, [1])))
    expect(e2).toMatchObject({ _tag: "DatasetFieldMissing", line: 2 })
    const wrongType = write("h.jsonl", '{"text": 5}\n')
    expect(await fail(openDataset({ path: wrongType }))).toMatchObject({
      _tag: "DatasetFieldInvalid",
      line: 1,
    })
  })

  it("an empty file, or a missing one, is a typed error naming it", async () => {
    const empty = write("empty.jsonl", "\n \n")
    const e = await fail(openDataset({ path: empty }))
    expect(e._tag).toBe("DatasetEmpty")
    expect(e.message).toContain(empty)
    const missing = path.join(tmp, "nope.jsonl")
    expect(await fail(openDataset({ path: missing }))).toMatchObject({
      _tag: "DatasetFileError",
      file: missing,
    })
  })
})

describe(".parquet", () => {
  for (const name of ["rows.parquet", "rows-snappy.parquet"])
    it(`reads pyarrow's ${name} exactly, in file order and at random`, async () => {
      const file = path.join(parquetDir, name)
      expect(await all({ path: file })).toEqual(reference.text)
      expect(await all({ path: file, field: "messages" })).toEqual(reference.messages)
      const index = await run(openDataset({ path: file, field: "messages" }))
      expect(index.count).toBe(25)
      const rows = await run(readExamples(index, [24, 3, 17, 9, 0]))
      expect(rows.map((r) => r.example)).toEqual([24, 3, 17, 9, 0].map((i) => reference.messages[i]))
      expect(rows.map((r) => r.at.row)).toEqual([24, 3, 17, 9, 0])
    })

  it("a field the file lacks is a typed error listing its columns", async () => {
    const e = await fail(openDataset({ path: path.join(parquetDir, "rows.parquet"), field: "body" }))
    expect(e).toMatchObject({ _tag: "DatasetFieldMissing", available: ["id", "text", "messages"] })
    const id = await fail(loadExamples({ path: path.join(parquetDir, "rows.parquet"), field: "id" }))
    expect(id).toMatchObject({ _tag: "DatasetFieldInvalid", row: 0 })
  })

  it("a file that is not Parquet is a typed error", async () => {
    const file = write("x.parquet", "PAR1 this is not parquet PAR1")
    expect((await fail(openDataset({ path: file })))._tag).toBe("DatasetFormatUnsupported")
  })
})

describe(".txt", () => {
  it("is one example per line, blank lines kept so outputs line up with inputs", async () => {
    const file = write("p.txt", "first prompt\r\n\nthird\n")
    expect(await all({ path: file })).toEqual(["first prompt", "", "third"])
  })
})

describe("Hub dataset repositories", () => {
  const parquet = fs.readFileSync(path.join(parquetDir, "rows-snappy.parquet"))
  const jsonl = (tag: string, n: number) =>
    Array.from({ length: n }, (_, i) => JSON.stringify({ text: `${tag} ${i}` })).join("\n")
  const hub = Hub.memory({
    "org/pushed": {
      "README.md": "# a dataset",
      "data/train-00000-of-00002.parquet": parquet,
      "data/train-00001-of-00002.parquet": parquet,
      "data/test-00000-of-00001.parquet": parquet,
    },
    "org/configs": {
      "sft/train-00000-of-00001.parquet": parquet,
      "sft/test-00000-of-00001.jsonl": jsonl("sft test", 2),
      "other/train-00000-of-00001.jsonl": jsonl("other train", 3),
    },
    "org/dirs": {
      "train/a.jsonl": jsonl("train a", 2),
      "train/b.jsonl": jsonl("train b", 2),
      "validation/x.jsonl": jsonl("val x", 1),
    },
    "org/converted": {
      "default/train/0000.parquet": parquet,
      "default/validation/0000.parquet": parquet,
      "cfg/train/0000.jsonl": jsonl("cfg", 4),
    },
    "org/named": { "my_train.jsonl": jsonl("named train", 2), "my-test.jsonl": jsonl("named test", 1) },
    "org/plain": { "corpus.jsonl": jsonl("plain", 3), "notes.md": "x" },
  })

  it("finds data/<split>-*.parquet shards", async () => {
    expect((await all({ path: "org/pushed" }, hub)).length).toBe(50)
    expect((await all({ path: "org/pushed", split: "test" }, hub)).length).toBe(25)
    const index = await run(openDataset({ path: "org/pushed" }), hub)
    expect(index.files.map((f) => f.name)).toEqual([
      "org/pushed/data/train-00000-of-00002.parquet",
      "org/pushed/data/train-00001-of-00002.parquet",
    ])
  })

  it("finds <config>/<split>-* files of a config, and only that config's", async () => {
    expect((await all({ path: "org/configs", config: "sft" }, hub)).length).toBe(25)
    expect(await all({ path: "org/configs", config: "sft", split: "test" }, hub)).toEqual([
      "sft test 0",
      "sft test 1",
    ])
    expect(await all({ path: "org/configs", config: "other" }, hub)).toEqual([
      "other train 0",
      "other train 1",
      "other train 2",
    ])
  })

  it("finds <split>/*.jsonl and <config>/<split>/*", async () => {
    expect(await all({ path: "org/dirs" }, hub)).toEqual(["train a 0", "train a 1", "train b 0", "train b 1"])
    expect(await all({ path: "org/dirs", split: "validation" }, hub)).toEqual(["val x 0"])
    expect((await all({ path: "org/converted" }, hub)).length).toBe(25)
    expect((await all({ path: "org/converted", split: "validation" }, hub)).length).toBe(25)
    expect((await all({ path: "org/converted", config: "cfg" }, hub)).length).toBe(4)
  })

  it("finds files whose name holds the split, and takes a repository without splits as train", async () => {
    expect(await all({ path: "org/named" }, hub)).toEqual(["named train 0", "named train 1"])
    expect(await all({ path: "org/named", split: "test" }, hub)).toEqual(["named test 0"])
    expect(await all({ path: "org/plain" }, hub)).toEqual(["plain 0", "plain 1", "plain 2"])
  })

  it("a split or config that is not there is a typed error listing the data files", async () => {
    const e = await fail(openDataset({ path: "org/pushed", split: "validation" }), hub)
    expect(e._tag).toBe("DatasetSplitNotFound")
    expect(e.message).toContain("data/test-00000-of-00001.parquet")
    const c = await fail(openDataset({ path: "org/configs", config: "nope" }), hub)
    expect(c).toMatchObject({ _tag: "DatasetSplitNotFound", config: "nope" })
  })

  it("matches datasets' split keywords in names, and not inside words", () => {
    const files = [
      "training/a.jsonl",
      "dev.jsonl",
      "data/eval-0.parquet",
      "trainer.jsonl",
      "x/valid_set.jsonl",
    ]
    expect(selectSplitFiles(files, "train")).toEqual(["training/a.jsonl"])
    expect(selectSplitFiles(files, "validation")).toEqual(["dev.jsonl", "x/valid_set.jsonl"])
    expect(selectSplitFiles(files, "test")).toEqual(["data/eval-0.parquet"])
  })
})

describe("paths from a repository stay inside the dataset", () => {
  it("refuses .., absolute paths and backslashes", async () => {
    const ok = write("ok/train.jsonl", "{}")
    await expect(checkDataPath("r", "../train.jsonl", ok)).rejects.toMatchObject({
      _tag: "DatasetUnsafePath",
    })
    await expect(checkDataPath("r", "/etc/passwd", "/etc/passwd")).rejects.toMatchObject({
      _tag: "DatasetUnsafePath",
    })
    await expect(checkDataPath("r", "a\\..\\b.jsonl", ok)).rejects.toMatchObject({
      _tag: "DatasetUnsafePath",
    })
    await expect(checkDataPath("r", "ok/train.jsonl", ok)).resolves.toBe(ok)
  })

  it("refuses a file of a local dataset directory that links outside it", async () => {
    const outside = write("secret.jsonl", '{"text": "secret"}\n')
    const dir = path.join(tmp, "linked")
    fs.mkdirSync(path.join(dir, "data"), { recursive: true })
    fs.symlinkSync(outside, path.join(dir, "data", "train.jsonl"))
    const e = await fail(openDataset({ path: dir }))
    // The Hub's local directory refuses the link first; the dataset's own check stands behind it.
    expect(["DatasetUnsafePath", "HubUnsafePath"]).toContain(e._tag)
    expect(e.message).toMatch(/outside the (dataset|repository)/)
  })

  it("accepts a Hugging Face cache snapshot, whose files link into the entry's blobs", async () => {
    const entry = path.join(tmp, "cache", "datasets--org--name")
    const snap = path.join(entry, "snapshots", "abc")
    fs.mkdirSync(path.join(entry, "blobs"), { recursive: true })
    fs.mkdirSync(path.join(snap, "data"), { recursive: true })
    fs.writeFileSync(path.join(entry, "blobs", "f00d"), '{"text": "cached"}\n')
    fs.symlinkSync(path.join("..", "..", "..", "blobs", "f00d"), path.join(snap, "data", "train.jsonl"))
    const file = path.join(snap, "data", "train.jsonl")
    await expect(checkDataPath("org/name", "data/train.jsonl", file)).resolves.toBe(file)
    expect(await all({ path: snap })).toEqual(["cached"])
  })
})

describe("examples into tokens", () => {
  const tokenizer = (addEosToken: boolean) =>
    run(loadTokenizer(path.join(root, "test", "fixtures", "tokenizer", "bpe"), { addEosToken }))

  it("encodes text with BOS and the appended EOS, and chats through the template", async () => {
    const tok = await tokenizer(true)
    const at = { file: "f", line: 1 }
    expect(exampleTokens(tok, "Hello world", at, "text")).toEqual([
      1, 42, 264, 78, 81, 223, 89, 81, 84, 78, 70, 2,
    ])
    const chat = reference.messages[0]!
    const ids = exampleTokens(tok, chat, at, "messages", { useChatTemplate: true })
    // The template ends with EOS and a newline, so one more EOS closes the document.
    expect(ids).toEqual([...tok.encode(tok.renderChat(chat), { addSpecialTokens: false }), 2])
    expect(tok.decode(ids)).toBe("<s><|user|>\nq0</s>\n<|assistant|>\na0</s>\n</s>")
    expect(() => exampleTokens(tok, chat, at, "messages")).toThrow(/chat template is off/)
  })

  it("prompts for generation get no EOS, and chats get the generation prompt", async () => {
    const tok = await tokenizer(true)
    const file = write("prompts.txt", "Hello world\n")
    expect(await run(loadPrompts({ path: file }, tok))).toEqual([
      [1, 42, 264, 78, 81, 223, 89, 81, 84, 78, 70],
    ])
    const chats = await run(
      loadPrompts({ path: path.join(parquetDir, "rows.parquet"), field: "messages" }, tok, {
        useChatTemplate: true,
      }),
    )
    expect(chats.length).toBe(25)
    expect(tok.decode(chats[1]!)).toBe("<s><|user|>\nq1</s>\n<|assistant|>\na1</s>\n<|assistant|>\n")
  })
})
