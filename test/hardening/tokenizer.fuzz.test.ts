/**
 * Fuzzing tokenizer files: mutated tokenizer.json, tokenizer_config.json (special tokens, chat
 * template) and generation_config.json either build a tokenizer that encodes, decodes and renders
 * its chat template, or fail with a typed error.
 */
import { readFileSync, rmSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { type TokenizerSource, tokenizerFromSource } from "../../src/layers/Tokenizer.ts"
import { fixtures } from "../helpers.ts"
import {
  count,
  fuzzParams,
  fuzzWorkspace,
  type Json,
  mutatedJson,
  mutatedJsonText,
  settle,
  settleSync,
} from "./fuzz.ts"

const { dir } = fuzzWorkspace("magix-fuzz-tok-")

const buildTags = ["TokenizerFileInvalid", "TokenizerSpecialTokenInvalid"]
const chatTags = ["ChatTemplateMissing", "ChatTemplateError"]

const bpe = join(fixtures, "tokenizer", "bpe")
const tokenizerText = readFileSync(join(bpe, "tokenizer.json"), "utf8")
const configText = readFileSync(join(bpe, "tokenizer_config.json"), "utf8")
const tokenizerJson = JSON.parse(tokenizerText) as Record<string, Json>

/** A mutation inside one top-level section, so the small sections get as much attention as the vocabulary. */
const mutatedSection: fc.Arbitrary<string> = fc
  .constantFrom(...Object.keys(tokenizerJson))
  .chain((key) =>
    mutatedJson(tokenizerJson[key]!).map((section) =>
      JSON.stringify({ ...tokenizerJson, [key]: JSON.parse(section) }),
    ),
  )

const texts = fc.oneof(
  fc.constantFrom("", "hello world", "<s>hi</s>", " \n\t", "é漢字🙂", "\u0000", "a".repeat(2000)),
  fc.string({ maxLength: 40 }),
)

/** Builds from the files and uses the tokenizer as training and generation do. */
const exercise = (source: TokenizerSource, text: string) => {
  const built = settleSync(() => tokenizerFromSource(source), buildTags)
  if (!built.ok) return undefined
  const t = built.value
  // A tokenizer that builds may still be damaged where only use reaches: that too is a typed error.
  const used = settleSync(() => {
    const ids = t.encode(text)
    t.encode(text, { addSpecialTokens: false })
    t.decode(ids)
    t.decode(ids, { skipSpecialTokens: true })
    t.decode([0, t.vocabSize - 1, t.padTokenId])
  }, ["TokenizerFileInvalid"])
  if (!used.ok) return undefined
  settleSync(() => t.renderChat([{ role: "user", content: text }], { addGenerationPrompt: true }), chatTags)
  return t
}

let n = 0
const write = (name: string, text: string) => {
  const path = join(dir, `${n++}-${name}`)
  writeFileSync(path, text)
  return path
}

describe("tokenizer files", () => {
  it("a mutated tokenizer.json builds a working tokenizer or fails with a typed error", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(mutatedSection, mutatedJsonText(tokenizerText)),
        texts,
        async (json, text) => {
          count("tokenizer.json")
          const tokenizerFile = write("tokenizer.json", json)
          const configFile = write("tokenizer_config.json", configText)
          const t = exercise(
            { repo: "fuzz", tokenizerFile, configFile, addEosToken: true, padWithEos: false },
            text,
          )
          if (t !== undefined)
            await settle(t.applyChatTemplate([{ role: "user", content: text }], { tokenize: true }), [
              ...chatTags,
              "TokenizerFileInvalid",
            ])
          rmSync(tokenizerFile)
          rmSync(configFile)
        },
      ),
      fuzzParams(150),
    )
  })

  it("a mutated tokenizer_config.json and generation_config.json", async () => {
    const tokenizerFile = write("tokenizer.json", tokenizerText)
    const generation = JSON.stringify({ bos_token_id: 1, eos_token_id: [2, 3], pad_token_id: 0 })
    await fc.assert(
      fc.asyncProperty(
        mutatedJsonText(configText),
        fc.option(mutatedJsonText(generation)),
        texts,
        async (config, gen, text) => {
          count("tokenizer_config.json")
          const configFile = write("tokenizer_config.json", config)
          const generationConfigFile = gen === null ? undefined : write("generation_config.json", gen)
          exercise(
            {
              repo: "fuzz",
              tokenizerFile,
              configFile,
              ...(generationConfigFile === undefined ? {} : { generationConfigFile }),
              addEosToken: false,
              padWithEos: true,
            },
            text,
          )
          rmSync(configFile)
          if (generationConfigFile !== undefined) rmSync(generationConfigFile)
        },
      ),
      fuzzParams(300),
    )
  })
})

describe("tokenizer regressions found by fuzzing", () => {
  const withModel = (change: (model: Record<string, Json>) => void) => {
    const json = structuredClone(tokenizerJson) as Record<string, Json>
    change(json.model as Record<string, Json>)
    return write("tokenizer.json", JSON.stringify(json))
  }

  it("a vocabulary id of 2^31 is TokenizerFileInvalid at once, not minutes inside the library", () => {
    const tokenizerFile = withModel((m) => {
      ;(m.vocab as Record<string, Json>)["@"] = 2 ** 31
    })
    const r = settleSync(
      () => tokenizerFromSource({ repo: "r", tokenizerFile, addEosToken: false, padWithEos: false }),
      buildTags,
    )
    expect(r.ok).toBe(false)
  })

  it("merges that make a token outside the vocabulary are TokenizerFileInvalid on encode, not ids of undefined", () => {
    const tokenizerFile = withModel((m) => {
      m.merges = [
        ["a", "p>5"],
        ["i", "s"],
        ["t", "h"],
      ]
      m.vocab = Object.fromEntries(
        Object.entries(m.vocab as Record<string, Json>).filter(([k]) => k !== "is"),
      )
    })
    const built = settleSync(
      () =>
        tokenizerFromSource({
          repo: "r",
          tokenizerFile,
          configFile: write("c.json", configText),
          addEosToken: false,
          padWithEos: false,
        }),
      buildTags,
    )
    if (!built.ok) return
    const used = settleSync(() => built.value.encode("this is it"), ["TokenizerFileInvalid"])
    if (used.ok) for (const id of used.value) expect(Number.isInteger(id)).toBe(true)
  })
})
