/**
 * The tokenizer against references made by Python `tokenizers` and transformers'
 * apply_chat_template (test/fixtures/tokenizer/bpe/reference.json), and the embedded default
 * model's byte-level tokenizer (examples/tiny).
 */
import * as fs from "node:fs"
import * as path from "node:path"
import { Effect, type Layer } from "effect"
import { describe, expect, it } from "vitest"
import { Hub } from "../../src/layers/Hub.ts"
import { type LoadTokenizerOptions, loadTokenizer, tokenizerFromSource } from "../../src/layers/Tokenizer.ts"

const root = path.join(import.meta.dirname, "..", "..")
const bpeDir = path.join(root, "test", "fixtures", "tokenizer", "bpe")
const tinyDir = path.join(root, "examples", "tiny")

interface Reference {
  readonly encode: ReadonlyArray<{ text: string; ids: number[]; ids_no_special: number[]; decoded: string }>
  readonly chat: ReadonlyArray<{
    messages: Array<{ role: string; content: string }>
    text: string
    ids: ReadonlyArray<unknown>
  }>
}
const reference: Reference = JSON.parse(fs.readFileSync(path.join(bpeDir, "reference.json"), "utf8"))

const read = (f: string) => fs.readFileSync(path.join(bpeDir, f), "utf8")

const run = <A, E>(
  effect: Effect.Effect<A, E, Hub>,
  layer: Layer.Layer<Hub, unknown> = Hub.localDirectory(root),
) => Effect.runPromise(effect.pipe(Effect.provide(layer), Effect.orDie))

const fail = <A, E>(effect: Effect.Effect<A, E, Hub>, layer: Layer.Layer<Hub, unknown>) =>
  Effect.runPromise(effect.pipe(Effect.flip, Effect.provide(layer), Effect.orDie))

const load = (dir: string, options?: LoadTokenizerOptions) => run(loadTokenizer(dir, options))

describe("tokenizer parity (bpe fixture)", () => {
  it("encodes every reference text exactly, with and without special tokens, and decodes it back", async () => {
    const tok = await load(bpeDir)
    for (const c of reference.encode) {
      expect(tok.encode(c.text), c.text).toEqual(c.ids)
      expect(tok.encode(c.text, { addSpecialTokens: false }), c.text).toEqual(c.ids_no_special)
      expect(tok.decode(c.ids_no_special, { skipSpecialTokens: true }), c.text).toBe(c.decoded)
    }
  })

  it("keeps special tokens on decode unless asked to skip them (transformers' default)", async () => {
    const tok = await load(bpeDir)
    const c = reference.encode.find((e) => e.text.includes("</s>"))!
    expect(tok.decode(c.ids)).toBe(`<s>${c.text}`)
    expect(tok.decode([])).toBe("")
    expect(tok.decode(Int32Array.from(c.ids_no_special), { skipSpecialTokens: true })).toBe(c.decoded)
  })

  it("renders the chat template as transformers does, and tokenizes it without adding special tokens", async () => {
    const tok = await load(bpeDir)
    for (const c of reference.chat) {
      const text = await Effect.runPromise(tok.applyChatTemplate(c.messages, { addGenerationPrompt: true }))
      expect(text).toBe(c.text)
      const ids = await Effect.runPromise(
        tok.applyChatTemplate(c.messages, { addGenerationPrompt: true, tokenize: true }),
      )
      // The fixture's chat "ids" hold the keys of a BatchEncoding (["input_ids", "attention_mask"]),
      // not ids, when made with a transformers whose apply_chat_template returns one; then compare
      // with what transformers does: the rendered text encoded with add_special_tokens=False.
      if (c.ids.every((x) => typeof x === "number")) expect(ids).toEqual(c.ids)
      expect(ids).toEqual(tok.encode(c.text, { addSpecialTokens: false }))
      expect(ids[0]).toBe(tok.bosTokenId)
      expect(tok.decode(ids)).toBe(c.text)
    }
    const noPrompt = await Effect.runPromise(tok.applyChatTemplate(reference.chat[0]!.messages))
    expect(noPrompt).toBe(reference.chat[0]!.text.replace(/<\|assistant\|>\n$/, ""))
  })

  it("reads the special tokens of tokenizer_config.json", async () => {
    const tok = await load(bpeDir)
    expect(tok.bosTokenId).toBe(1)
    expect(tok.eosTokenId).toBe(2)
    expect(tok.eosTokenIds).toEqual([2])
    expect(tok.padTokenId).toBe(0)
    expect(tok.vocabSize).toBe(400)
    expect(tok.specialTokens).toMatchObject({ bos_token: "<s>", eos_token: "</s>", pad_token: "<pad>" })
    const padEos = await load(bpeDir, { padWithEos: true })
    expect(padEos.padTokenId).toBe(2)
  })

  it("appends EOS with addEosToken, only when special tokens are added", async () => {
    const tok = await load(bpeDir, { addEosToken: true })
    for (const c of reference.encode) {
      expect(tok.encode(c.text)).toEqual([...c.ids, 2])
      expect(tok.encode(c.text, { addSpecialTokens: false })).toEqual(c.ids_no_special)
    }
  })

  it("builds the same tokenizer from its source (what a worker thread does)", async () => {
    const tok = await load(bpeDir, { addEosToken: true })
    const again = tokenizerFromSource(structuredClone(tok.source))
    for (const c of reference.encode) expect(again.encode(c.text)).toEqual(tok.encode(c.text))
    expect(again.padTokenId).toBe(tok.padTokenId)
  })
})

describe("the tiny model's byte-level tokenizer", () => {
  it('encodes "7+8=15" as [1, 25, 13, 26, 31, 19, 23] with the BOS', async () => {
    const tok = await load(tinyDir)
    expect(tok.encode("7+8=15")).toEqual([1, 25, 13, 26, 31, 19, 23])
    expect(tok.encode("7+8=15", { addSpecialTokens: false })).toEqual([25, 13, 26, 31, 19, 23])
    expect(tok.decode([1, 25, 13, 26, 31, 19, 23], { skipSpecialTokens: true })).toBe("7+8=15")
    expect(tok.vocabSize).toBe(259)
    expect(tok.chatTemplate).toBeUndefined()
  })

  it("loads through a Hub repository id as well as a directory", async () => {
    const files = Object.fromEntries(
      ["tokenizer.json", "tokenizer_config.json"].map((f) => [
        f,
        fs.readFileSync(path.join(tinyDir, f), "utf8"),
      ]),
    )
    const tok = await run(loadTokenizer("org/tiny", { addEosToken: true }), Hub.memory({ "org/tiny": files }))
    expect(tok.encode("7+8=15")).toEqual([1, 25, 13, 26, 31, 19, 23, 2])
  })
})

describe("tokenizer errors", () => {
  const memory = (files: Record<string, string>) => Hub.memory({ "org/t": files })

  it("a repository without tokenizer.json names the file and the fix", async () => {
    const e = await fail(loadTokenizer("org/t"), memory({ "tokenizer_config.json": "{}" }))
    expect(e._tag).toBe("TokenizerFileMissing")
    expect(e.message).toContain("tokenizer.json")
    expect(e.message).toContain("save_pretrained")
  })

  it("malformed JSON names the file", async () => {
    const e = await fail(
      loadTokenizer("org/t"),
      memory({ "tokenizer.json": read("tokenizer.json"), "tokenizer_config.json": "{ nope" }),
    )
    expect(e._tag).toBe("TokenizerFileInvalid")
    expect(e.message).toContain("tokenizer_config.json")
    expect(e.message).toContain("not valid JSON")
    const e2 = await fail(loadTokenizer("org/t"), memory({ "tokenizer.json": "[1, 2" }))
    expect(e2._tag).toBe("TokenizerFileInvalid")
    expect(e2.message).toContain("tokenizer.json")
  })

  it("asking for a chat template the tokenizer lacks is a typed error", async () => {
    const tok = await load(tinyDir)
    const e = await Effect.runPromise(Effect.flip(tok.applyChatTemplate([{ role: "user", content: "hi" }])))
    expect(e._tag).toBe("ChatTemplateMissing")
    expect(e.message).toContain("chat template")
  })

  it("raise_exception in a template becomes ChatTemplateError with its text", async () => {
    const config = JSON.parse(read("tokenizer_config.json"))
    config.chat_template =
      "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok"
    const layer = memory({
      "tokenizer.json": read("tokenizer.json"),
      "tokenizer_config.json": JSON.stringify(config),
    })
    const tok = await run(loadTokenizer("org/t"), layer)
    const e = await Effect.runPromise(Effect.flip(tok.applyChatTemplate([{ role: "system", content: "x" }])))
    expect(e._tag).toBe("ChatTemplateError")
    expect(e.message).toContain("System role not supported")
    expect(await Effect.runPromise(tok.applyChatTemplate([{ role: "user", content: "x" }]))).toBe("ok")
  })

  it("a special token missing from the vocabulary is a typed error", async () => {
    const config = { ...JSON.parse(read("tokenizer_config.json")), eos_token: "<nope>" }
    const e = await fail(
      loadTokenizer("org/t"),
      memory({ "tokenizer.json": read("tokenizer.json"), "tokenizer_config.json": JSON.stringify(config) }),
    )
    expect(e._tag).toBe("TokenizerSpecialTokenInvalid")
    expect(e.message).toContain("<nope>")
  })

  it("takes extra EOS ids from generation_config.json and named templates from tokenizer_config.json", async () => {
    const config = {
      ...JSON.parse(read("tokenizer_config.json")),
      chat_template: [
        { name: "default", template: "D{{ messages[0].content }}" },
        { name: "tool_use", template: "T" },
      ],
    }
    const layer = memory({
      "tokenizer.json": read("tokenizer.json"),
      "tokenizer_config.json": JSON.stringify(config),
      "generation_config.json": JSON.stringify({ eos_token_id: [2, 0] }),
    })
    const tok = await run(loadTokenizer("org/t"), layer)
    expect(tok.eosTokenIds).toEqual([2, 0])
    expect(await Effect.runPromise(tok.applyChatTemplate([{ role: "user", content: "x" }]))).toBe("Dx")
    const named = await run(loadTokenizer("org/t", { chatTemplateName: "tool_use" }), layer)
    expect(await Effect.runPromise(named.applyChatTemplate([{ role: "user", content: "x" }]))).toBe("T")
  })
})
