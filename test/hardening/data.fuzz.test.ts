/**
 * Fuzzing dataset files: mutated and random JSON Lines, text and Parquet files (metadata at the
 * end, pages, compression) are indexed and every example read, or fail with a typed data error.
 */
import { readFileSync, rmSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { Effect } from "effect"
import fc from "fast-check"
import { describe, it } from "vitest"
import { openDataset, readExamples } from "../../src/layers/Dataset.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { fixtures } from "../helpers.ts"
import {
  count,
  fuzzParams,
  fuzzWorkspace,
  mutatedBytes,
  mutatedJsonText,
  mutatedTail,
  settle,
} from "./fuzz.ts"

const { dir } = fuzzWorkspace("magix-fuzz-data-")

const dataTags = [
  "DatasetParseError",
  "DatasetFieldMissing",
  "DatasetFieldInvalid",
  "DatasetEmpty",
  "DatasetFileError",
  "DatasetFormatUnsupported",
]

let n = 0
/** Indexes the file and reads every example, as generate does with its prompts. */
const readAll = (bytes: Uint8Array, ext: string, field: string) => {
  const path = join(dir, `${n++}.${ext}`)
  writeFileSync(path, bytes)
  return Effect.gen(function* () {
    const index = yield* openDataset({ path, field })
    yield* readExamples(
      index,
      Array.from({ length: Math.min(index.count, 200) }, (_, i) => i),
    )
  }).pipe(
    Effect.provide(Hub.localDirectory(dir)),
    Effect.ensuring(Effect.sync(() => rmSync(path, { force: true }))),
  )
}

const lines = [
  { text: "plain text" },
  { text: "é漢字🙂\n\ttabs" },
  {
    messages: [
      { role: "user", content: "hi" },
      { role: "assistant", content: "hello" },
    ],
  },
  { text: "" },
]
const jsonl = `${lines.map((l) => JSON.stringify(l)).join("\n")}\n`

describe("JSON Lines and text", () => {
  it("mutated JSON Lines, line by line or as bytes", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc
            .array(mutatedJsonText(JSON.stringify(lines[2])), { minLength: 1, maxLength: 4 })
            .map((ls) => ls.join("\n")),
          mutatedBytes(new TextEncoder().encode(jsonl)).map((b) => Buffer.from(b).toString("utf8")),
        ),
        fc.constantFrom("text", "messages", "__proto__", ""),
        async (text, field) => {
          count("jsonl")
          await settle(readAll(new TextEncoder().encode(text), "jsonl", field), dataTags)
        },
      ),
      fuzzParams(200),
    )
  })

  it("random bytes as .jsonl and .txt", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ maxLength: 300 }),
        fc.constantFrom("jsonl", "txt"),
        async (bytes, ext) => {
          count(ext)
          await settle(readAll(bytes, ext, "text"), dataTags)
        },
      ),
      fuzzParams(150),
    )
  })
})

describe("Parquet", () => {
  const seeds = ["rows.parquet", "rows-snappy.parquet"].map(
    (f) => new Uint8Array(readFileSync(join(fixtures, "parquet", f))),
  )

  it("mutated Parquet files: footer metadata, pages and whole-file damage", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...seeds).chain((seed) => fc.oneof(mutatedTail(seed, 1024), mutatedBytes(seed))),
        fc.constantFrom("text", "messages", "id"),
        async (bytes, field) => {
          count("parquet")
          await settle(readAll(bytes, "parquet", field), dataTags, { timeoutMs: 10_000 })
        },
      ),
      fuzzParams(200),
    )
  })

  it("random bytes as .parquet, with and without the PAR1 magic", async () => {
    const magic = new TextEncoder().encode("PAR1")
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 200 }), fc.boolean(), async (body, framed) => {
        count("parquet")
        const bytes = framed ? new Uint8Array([...magic, ...body, 0, 0, 0, 0, ...magic]) : body
        if (framed) new DataView(bytes.buffer).setUint32(bytes.length - 8, body.length, true)
        await settle(readAll(bytes, "parquet", "text"), dataTags)
      }),
      fuzzParams(150),
    )
  })
})
