/**
 * Hugging Face tokenizers: `tokenizer.json` through `@huggingface/tokenizers` (pure JS, the same
 * pre-tokenizers, models and post-processors as the Rust library), special tokens from
 * `tokenizer_config.json` (or the older `special_tokens_map.json`), chat templates rendered with
 * `@huggingface/jinja` with the variables transformers' `apply_chat_template` passes.
 *
 * Files are found through the Hub service, so a model id, a cached snapshot and a local directory
 * all work. The files found are kept as a `TokenizerSource` of local paths, from which a worker
 * thread builds the very same tokenizer without the Hub (`tokenizerFromSource`).
 */
import * as fs from "node:fs"
import { Template } from "@huggingface/jinja"
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers"
import { Effect, Schema } from "effect"
import { attemptSync, hasTag } from "../core/data/errors.ts"
import type { ChatMessage } from "../core/data/examples.ts"
import { Hub, type HubError } from "./Hub.ts"

// ---------------------------------------------------------------------------------------------
// Errors

/** The repository has no `tokenizer.json` (a slow, SentencePiece-only tokenizer, or no tokenizer). */
export class TokenizerFileMissing extends Schema.TaggedError<TokenizerFileMissing>()("TokenizerFileMissing", {
  repo: Schema.String,
  file: Schema.String,
}) {
  override get message() {
    return (
      `"${this.repo}" has no ${this.file}. Magix reads fast tokenizers only: point --tokenizer at a repository ` +
      "or directory that has one, or convert it with transformers " +
      "(AutoTokenizer.from_pretrained(...).save_pretrained(dir) writes tokenizer.json)"
    )
  }
}

/** A tokenizer file that is not valid JSON, or describes something the tokenizer library cannot build. */
export class TokenizerFileInvalid extends Schema.TaggedError<TokenizerFileInvalid>()("TokenizerFileInvalid", {
  file: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return (
      `${this.file} cannot be used: ${this.detail}. The file is damaged or of an unsupported kind: ` +
      "download it again, or write it again with transformers' tokenizer.save_pretrained"
    )
  }
}

/** A special token (bos, eos, pad) the configuration names but the vocabulary lacks, or one that is needed and not named. */
export class TokenizerSpecialTokenInvalid extends Schema.TaggedError<TokenizerSpecialTokenInvalid>()(
  "TokenizerSpecialTokenInvalid",
  { file: Schema.String, role: Schema.String, detail: Schema.String },
) {
  override get message() {
    return `${this.file}: ${this.role}_token ${this.detail}. Set "${this.role}_token" in tokenizer_config.json to a token of the vocabulary`
  }
}

/** A chat template was asked for and the tokenizer has none. */
export class ChatTemplateMissing extends Schema.TaggedError<ChatTemplateMissing>()("ChatTemplateMissing", {
  repo: Schema.String,
}) {
  override get message() {
    return (
      `the tokenizer of "${this.repo}" has no chat template (no "chat_template" in tokenizer_config.json and ` +
      "no chat_template.jinja). Use the tokenizer of a chat/instruct model, pass a template (chatTemplate), " +
      "or train on plain text without the chat template"
    )
  }
}

/** The chat template does not parse, fails while rendering, or calls raise_exception. */
export class ChatTemplateError extends Schema.TaggedError<ChatTemplateError>()("ChatTemplateError", {
  repo: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return (
      `the chat template of "${this.repo}" failed: ${this.detail}. Check the messages (roles, their order, ` +
      "a system message the template may not allow) or pass another template"
    )
  }
}

export type TokenizerError =
  | TokenizerFileMissing
  | TokenizerFileInvalid
  | TokenizerSpecialTokenInvalid
  | ChatTemplateMissing
  | ChatTemplateError

/** Every tokenizer error by tag, to rebuild one that crossed a thread boundary as plain fields. */
export const tokenizerErrorClasses = {
  TokenizerFileMissing,
  TokenizerFileInvalid,
  TokenizerSpecialTokenInvalid,
  ChatTemplateMissing,
  ChatTemplateError,
} as const

// ---------------------------------------------------------------------------------------------
// The tokenizer

/** Local files and settings from which `tokenizerFromSource` builds a tokenizer; plain data. */
export interface TokenizerSource {
  /** As the caller named it, for messages. */
  readonly repo: string
  readonly tokenizerFile: string
  readonly configFile?: string
  readonly specialTokensMapFile?: string
  readonly chatTemplateFile?: string
  readonly generationConfigFile?: string
  readonly addEosToken: boolean
  readonly padWithEos: boolean
  readonly chatTemplate?: string
  readonly chatTemplateName?: string
}

export interface LoadTokenizerOptions {
  /** Branch, tag or commit of a Hub repository. */
  readonly revision?: string
  /**
   * Append EOS to every text encoded with special tokens, as transformers' `add_eos_token=True`
   * (the original Magix trains so, so each document ends with EOS). Default false.
   */
  readonly addEosToken?: boolean
  /** Pad with EOS even where the tokenizer names a pad token (`tokenizer.pad_token = tokenizer.eos_token`). */
  readonly padWithEos?: boolean
  /** A chat template (Jinja text) to use instead of the tokenizer's own. */
  readonly chatTemplate?: string
  /** Which of several named templates in tokenizer_config.json ("default" by default). */
  readonly chatTemplateName?: string
}

export interface EncodeOptions {
  /** Add BOS (and EOS with addEosToken) as the post-processor says. Default true, as transformers. */
  readonly addSpecialTokens?: boolean
  /** Override the tokenizer's addEosToken for this call (prompts for generation get none). */
  readonly addEosToken?: boolean
}

export interface DecodeOptions {
  /** Default false, as transformers. */
  readonly skipSpecialTokens?: boolean
}

export interface ChatTemplateOptions {
  /** Append the template's prompt for the assistant's turn (for generation). Default false. */
  readonly addGenerationPrompt?: boolean
  /** Return token ids (the text encoded without adding special tokens, as transformers) instead of text. */
  readonly tokenize?: boolean
}

export interface Tokenizer {
  readonly source: TokenizerSource
  /** Tokens including added ones (transformers' `len(tokenizer)`). */
  readonly vocabSize: number
  readonly bosTokenId: number | undefined
  /** The tokenizer's EOS, appended by addEosToken. */
  readonly eosTokenId: number | undefined
  /** Every id that ends generation: the tokenizer's EOS and generation_config.json's eos_token_id(s). */
  readonly eosTokenIds: ReadonlyArray<number>
  /** The pad token, else EOS, as the original Magix pads with EOS. */
  readonly padTokenId: number
  readonly addEosToken: boolean
  /** The special tokens' text, as the chat template sees them. */
  readonly specialTokens: Readonly<Record<string, string>>
  readonly chatTemplate: string | undefined
  readonly encode: (text: string, options?: EncodeOptions) => number[]
  readonly decode: (ids: ArrayLike<number>, options?: DecodeOptions) => string
  readonly applyChatTemplate: {
    (
      messages: ReadonlyArray<ChatMessage>,
      options: ChatTemplateOptions & { readonly tokenize: true },
    ): Effect.Effect<number[], ChatTemplateMissing | ChatTemplateError | TokenizerFileInvalid>
    (
      messages: ReadonlyArray<ChatMessage>,
      options?: ChatTemplateOptions & { readonly tokenize?: false },
    ): Effect.Effect<string, ChatTemplateMissing | ChatTemplateError | TokenizerFileInvalid>
  }
  /** The chat template's text, synchronously, for loops over many documents; throws the typed error. */
  readonly renderChat: (
    messages: ReadonlyArray<ChatMessage>,
    options?: { readonly addGenerationPrompt?: boolean },
  ) => string
}

type Json = Readonly<Record<string, unknown>>

const readJson = (file: string): Json => {
  let text: string
  try {
    text = fs.readFileSync(file, "utf8")
  } catch (e) {
    throw new TokenizerFileInvalid({ file, detail: e instanceof Error ? e.message : String(e) })
  }
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch (e) {
    throw new TokenizerFileInvalid({
      file,
      detail: `not valid JSON (${e instanceof Error ? e.message : String(e)})`,
    })
  }
  if (typeof value !== "object" || value === null || Array.isArray(value))
    throw new TokenizerFileInvalid({ file, detail: "not a JSON object" })
  return value as Json
}

/** A special token as tokenizer_config.json writes it: a string, or an AddedToken object with `content`. */
const tokenText = (v: unknown): string | undefined => {
  if (typeof v === "string") return v
  if (typeof v === "object" && v !== null && typeof (v as { content?: unknown }).content === "string")
    return (v as { content: string }).content
  return undefined
}

const ROLES = ["bos", "eos", "pad", "unk"] as const

/** The chat template: an override, chat_template.jinja, or tokenizer_config.json's (one string, or named ones). */
const pickTemplate = (source: TokenizerSource, config: Json): string | undefined => {
  if (source.chatTemplate !== undefined) return source.chatTemplate
  if (source.chatTemplateFile !== undefined) {
    try {
      return fs.readFileSync(source.chatTemplateFile, "utf8")
    } catch (e) {
      throw new TokenizerFileInvalid({
        file: source.chatTemplateFile,
        detail: e instanceof Error ? e.message : String(e),
      })
    }
  }
  const t = config.chat_template
  if (typeof t === "string") return t
  if (Array.isArray(t)) {
    const name = source.chatTemplateName ?? "default"
    const found = t.find((x: unknown) => (x as { name?: unknown } | null)?.name === name) as
      | { template?: unknown }
      | undefined
    return typeof found?.template === "string" ? found.template : undefined
  }
  return undefined
}

/** More ids than any vocabulary has (the largest are about 2^18); a larger id is damage. */
const MAX_TOKEN_ID = 2 ** 24

/**
 * Checks the ids of tokenizer.json's vocabulary and added tokens before the library sees them:
 * it sizes tables by the largest id, so one corrupt id of 2^31 would stall it for minutes.
 */
const checkTokenIds = (file: string, json: Json): void => {
  const bad = (token: string, id: unknown) =>
    new TokenizerFileInvalid({
      file,
      detail: `token ${JSON.stringify(token).slice(0, 40)} has id ${JSON.stringify(id)}, not an integer from 0 to ${MAX_TOKEN_ID}`,
    })
  const ok = (id: unknown) => Number.isSafeInteger(id) && (id as number) >= 0 && (id as number) < MAX_TOKEN_ID
  const vocab = (json.model as { vocab?: unknown } | null | undefined)?.vocab
  // BPE and WordPiece map tokens to ids; Unigram lists [token, score] pairs, ids being positions.
  if (typeof vocab === "object" && vocab !== null && !Array.isArray(vocab))
    for (const [token, id] of Object.entries(vocab)) if (!ok(id)) throw bad(token, id)
  if (Array.isArray(vocab) && vocab.length > MAX_TOKEN_ID) throw bad(String(vocab.length), vocab.length)
  const added = json.added_tokens
  if (Array.isArray(added))
    for (const t of added) {
      const id = (t as { id?: unknown } | null)?.id
      if (!ok(id)) throw bad(String((t as { content?: unknown } | null)?.content), id)
    }
}

/** Builds the tokenizer from local files; throws the typed error. Used as is by worker threads. */
export const tokenizerFromSource = (source: TokenizerSource): Tokenizer => {
  const json = readJson(source.tokenizerFile)
  checkTokenIds(source.tokenizerFile, json)
  const config = source.configFile === undefined ? {} : readJson(source.configFile)
  const map = source.specialTokensMapFile === undefined ? {} : readJson(source.specialTokensMapFile)
  const configFile = source.configFile ?? source.specialTokensMapFile ?? source.tokenizerFile

  const specialTokens: Record<string, string> = {}
  for (const role of ROLES) {
    const text = tokenText(config[`${role}_token`]) ?? tokenText(map[`${role}_token`])
    if (text !== undefined) specialTokens[`${role}_token`] = text
  }
  const additional = (config.additional_special_tokens ?? map.additional_special_tokens) as unknown
  const additionalTokens = Array.isArray(additional)
    ? additional.map(tokenText).filter((t): t is string => t !== undefined)
    : []

  let hf: HfTokenizer
  try {
    hf = new HfTokenizer(json, {
      ...config,
      additional_special_tokens: additionalTokens,
      // transformers has defaulted to false since 4.45; the Rust library never cleans up.
      clean_up_tokenization_spaces: config.clean_up_tokenization_spaces === true,
    })
  } catch (e) {
    throw new TokenizerFileInvalid({
      file: source.tokenizerFile,
      detail: e instanceof Error ? e.message : String(e),
    })
  }

  // The library builds lazily: a damaged model, merge list or post-processor can throw, or hand
  // back an id that is no integer, only when used. Either is this file's fault, said as such.
  const usingFile = <A>(what: string, f: () => A): A => {
    try {
      return f()
    } catch (e) {
      if (isTokenizerError(e)) throw e
      throw new TokenizerFileInvalid({
        file: source.tokenizerFile,
        detail: `${what} failed (${e instanceof Error ? e.message : String(e)})`,
      })
    }
  }
  const checkedIds = (what: string, ids: number[]): number[] => {
    for (const id of ids)
      if (!Number.isInteger(id))
        throw new TokenizerFileInvalid({
          file: source.tokenizerFile,
          detail: `${what} produced a token that is not in the vocabulary (id ${String(id)})`,
        })
    return ids
  }
  const encodeIds = (text: string, addSpecialTokens: boolean): number[] =>
    checkedIds(
      "encoding",
      usingFile("encoding", () => hf.encode(text, { add_special_tokens: addSpecialTokens }).ids),
    )

  const idOf = (role: (typeof ROLES)[number]): number | undefined => {
    const text = specialTokens[`${role}_token`]
    if (text === undefined) return undefined
    const id = usingFile("looking up a special token", () => hf.token_to_id(text))
    if (id === undefined)
      throw new TokenizerSpecialTokenInvalid({
        file: configFile,
        role,
        detail: `"${text}" is not in the vocabulary`,
      })
    return id
  }
  const bosTokenId = idOf("bos")
  const eosTokenId = idOf("eos")
  const ownPad = idOf("pad")
  const padTokenId = source.padWithEos ? (eosTokenId ?? ownPad) : (ownPad ?? eosTokenId)
  if (padTokenId === undefined)
    throw new TokenizerSpecialTokenInvalid({
      file: configFile,
      role: "pad",
      detail: "is not set, and neither is eos_token to pad with",
    })
  if (source.addEosToken && eosTokenId === undefined)
    throw new TokenizerSpecialTokenInvalid({
      file: configFile,
      role: "eos",
      detail: "is not set, so addEosToken has no token to append",
    })

  const eosTokenIds = eosTokenId === undefined ? [] : [eosTokenId]
  if (source.generationConfigFile !== undefined) {
    const g = readJson(source.generationConfigFile).eos_token_id
    for (const id of Array.isArray(g) ? g : [g])
      if (typeof id === "number" && Number.isInteger(id) && !eosTokenIds.includes(id)) eosTokenIds.push(id)
  }

  const vocabSize = usingFile("reading the vocabulary", () => hf.get_vocab(true).size)
  // A post-processor that already ends every sequence with EOS must not get a second one.
  const processorAddsEos = eosTokenId !== undefined && encodeIds("", true).at(-1) === eosTokenId

  const encode = (text: string, options: EncodeOptions = {}): number[] => {
    const special = options.addSpecialTokens ?? true
    const ids = encodeIds(text, special)
    if (
      special &&
      (options.addEosToken ?? source.addEosToken) &&
      !processorAddsEos &&
      eosTokenId !== undefined
    )
      ids.push(eosTokenId)
    return ids
  }
  const decode = (ids: ArrayLike<number>, options: DecodeOptions = {}): string =>
    ids.length === 0
      ? ""
      : usingFile("decoding", () =>
          hf.decode(Array.from(ids), { skip_special_tokens: options.skipSpecialTokens ?? false }),
        )

  const chatTemplate = pickTemplate(source, config)
  let compiled: Template | undefined
  const renderChat = (
    messages: ReadonlyArray<ChatMessage>,
    options: { readonly addGenerationPrompt?: boolean } = {},
  ) => {
    if (chatTemplate === undefined) throw new ChatTemplateMissing({ repo: source.repo })
    try {
      compiled ??= new Template(chatTemplate)
    } catch (e) {
      throw new ChatTemplateError({
        repo: source.repo,
        detail: `it does not parse: ${e instanceof Error ? e.message : String(e)}`,
      })
    }
    try {
      // The variables of transformers' render_jinja_template: the special tokens' text, messages,
      // tools and documents (None) and add_generation_prompt. raise_exception and strftime_now are
      // the library's own globals; raise_exception throws an Error with the template's text.
      return compiled.render({
        ...specialTokens,
        additional_special_tokens: additionalTokens,
        messages: messages.map((m) => ({ ...m })),
        tools: null,
        documents: null,
        add_generation_prompt: options.addGenerationPrompt ?? false,
      })
    } catch (e) {
      throw new ChatTemplateError({ repo: source.repo, detail: e instanceof Error ? e.message : String(e) })
    }
  }

  function applyChatTemplate(
    messages: ReadonlyArray<ChatMessage>,
    options: ChatTemplateOptions & { readonly tokenize: true },
  ): Effect.Effect<number[], ChatTemplateMissing | ChatTemplateError | TokenizerFileInvalid>
  function applyChatTemplate(
    messages: ReadonlyArray<ChatMessage>,
    options?: ChatTemplateOptions & { readonly tokenize?: false },
  ): Effect.Effect<string, ChatTemplateMissing | ChatTemplateError | TokenizerFileInvalid>
  function applyChatTemplate(
    messages: ReadonlyArray<ChatMessage>,
    options: ChatTemplateOptions = {},
  ): Effect.Effect<string | number[], ChatTemplateMissing | ChatTemplateError | TokenizerFileInvalid> {
    return attemptSync(
      () => {
        const text = renderChat(messages, options)
        // transformers encodes the rendered text without special tokens: the template has them.
        return options.tokenize ? encodeIds(text, false) : text
      },
      (e): e is ChatTemplateMissing | ChatTemplateError | TokenizerFileInvalid =>
        e instanceof ChatTemplateMissing ||
        e instanceof ChatTemplateError ||
        e instanceof TokenizerFileInvalid,
    )
  }

  return {
    source,
    vocabSize,
    bosTokenId,
    eosTokenId,
    eosTokenIds,
    padTokenId,
    addEosToken: source.addEosToken,
    specialTokens,
    chatTemplate,
    encode,
    decode,
    applyChatTemplate,
    renderChat,
  }
}

export const isTokenizerError: (e: unknown) => e is TokenizerError =
  hasTag<TokenizerError>(tokenizerErrorClasses)

/**
 * The tokenizer of a Hub repository or a local directory. `tokenizer.json` is required;
 * tokenizer_config.json, special_tokens_map.json, chat_template.jinja and generation_config.json
 * are read when present.
 */
export const loadTokenizer = (
  repoOrDir: string,
  options: LoadTokenizerOptions = {},
): Effect.Effect<Tokenizer, TokenizerError | HubError, Hub> =>
  Effect.gen(function* () {
    const hub = yield* Hub
    const resolve = options.revision === undefined ? {} : { revision: options.revision }
    const tokenizerFile = yield* hub
      .resolveFile(repoOrDir, "tokenizer.json", resolve)
      .pipe(
        Effect.catchTag("HubFileNotFound", () =>
          Effect.fail(new TokenizerFileMissing({ repo: repoOrDir, file: "tokenizer.json" })),
        ),
      )
    const optional = (file: string) =>
      hub.resolveFile(repoOrDir, file, resolve).pipe(
        Effect.map((p): string | undefined => p),
        Effect.catchTag(["HubFileNotFound", "HubNotCached"], () => Effect.succeed(undefined)),
      )
    const [configFile, specialTokensMapFile, chatTemplateFile, generationConfigFile] = yield* Effect.all(
      [
        optional("tokenizer_config.json"),
        optional("special_tokens_map.json"),
        optional("chat_template.jinja"),
        optional("generation_config.json"),
      ],
      { concurrency: 4 },
    )
    const source: TokenizerSource = {
      repo: repoOrDir,
      tokenizerFile,
      ...(configFile === undefined ? {} : { configFile }),
      ...(specialTokensMapFile === undefined ? {} : { specialTokensMapFile }),
      ...(chatTemplateFile === undefined ? {} : { chatTemplateFile }),
      ...(generationConfigFile === undefined ? {} : { generationConfigFile }),
      addEosToken: options.addEosToken ?? false,
      padWithEos: options.padWithEos ?? false,
      ...(options.chatTemplate === undefined ? {} : { chatTemplate: options.chatTemplate }),
      ...(options.chatTemplateName === undefined ? {} : { chatTemplateName: options.chatTemplateName }),
    }
    return yield* attemptSync(() => tokenizerFromSource(source), isTokenizerError)
  })
