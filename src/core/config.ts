/**
 * Model configuration: the `config.json` of a Hugging Face Llama, Mistral or Gemma checkpoint,
 * parsed with Schema into one normalized, fully defaulted `ModelConfig`, and written back in a
 * form `transformers` (4 and 5) loads. Defaults are transformers' own, so a config means here
 * what it means there; a setting Magix cannot honour is an error, never silently dropped.
 */
import { Effect, Schema, SchemaIssue } from "effect"
import type { DType } from "./dtype.ts"

export class InvalidConfig extends Schema.TaggedError<InvalidConfig>()("InvalidConfig", {
  source: Schema.String,
  field: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return `${this.source}: "${this.field}" ${this.reason}; fix that field of the model config`
  }
}

export class UnsupportedConfig extends Schema.TaggedError<UnsupportedConfig>()("UnsupportedConfig", {
  source: Schema.String,
  field: Schema.String,
  value: Schema.String,
  supported: Schema.String,
}) {
  override get message() {
    return (
      `${this.source}: "${this.field}" is ${this.value}, which Magix does not support ` +
      `(supported: ${this.supported}); use a model with a supported setting`
    )
  }
}

export type ConfigError = InvalidConfig | UnsupportedConfig

export const modelTypes = ["llama", "mistral", "gemma"] as const
export type ModelType = (typeof modelTypes)[number]

export type HiddenAct = "silu" | "gelu_pytorch_tanh"

export type RopeConfig =
  | { readonly type: "default"; readonly theta: number }
  | {
      readonly type: "llama3"
      readonly theta: number
      readonly factor: number
      readonly lowFreqFactor: number
      readonly highFreqFactor: number
      readonly originalMaxPositionEmbeddings: number
    }

export interface ModelConfig {
  readonly modelType: ModelType
  readonly vocabSize: number
  readonly hiddenSize: number
  readonly intermediateSize: number
  readonly numHiddenLayers: number
  readonly numAttentionHeads: number
  readonly numKeyValueHeads: number
  readonly headDim: number
  readonly maxPositionEmbeddings: number
  readonly rmsNormEps: number
  readonly rope: RopeConfig
  readonly tieWordEmbeddings: boolean
  readonly hiddenAct: HiddenAct
  /** Mistral's attention window in tokens; null where attention is full. */
  readonly slidingWindow: number | null
  readonly bosTokenId: number | null
  /** As the config gives it: Llama 3 lists several. */
  readonly eosTokenId: number | ReadonlyArray<number> | null
  readonly padTokenId: number | null
  /** The dtype the checkpoint was saved in, where the config says. */
  readonly dtype: DType | null
}

const PositiveInt = Schema.Number.check(Schema.isInt(), Schema.isGreaterThan(0))
const NonNegativeInt = Schema.Number.check(Schema.isInt(), Schema.isGreaterThanOrEqualTo(0))
const Positive = Schema.Number.check(Schema.isFinite(), Schema.isGreaterThan(0))
const opt = <S extends Schema.Top>(s: S) => Schema.optional(Schema.NullOr(s))

const RopeDict = Schema.Struct({
  rope_type: opt(Schema.String),
  type: opt(Schema.String),
  rope_theta: opt(Positive),
  factor: opt(Positive),
  low_freq_factor: opt(Positive),
  high_freq_factor: opt(Positive),
  original_max_position_embeddings: opt(PositiveInt),
  partial_rotary_factor: opt(Positive),
})
type RopeDict = typeof RopeDict.Type

// Unknown keys are dropped: transformers writes many fields (use_cache, initializer_range...)
// that change nothing here.
const RawConfig = Schema.Struct({
  model_type: Schema.String,
  vocab_size: PositiveInt,
  hidden_size: PositiveInt,
  intermediate_size: PositiveInt,
  num_hidden_layers: PositiveInt,
  num_attention_heads: PositiveInt,
  num_key_value_heads: opt(PositiveInt),
  head_dim: opt(PositiveInt),
  max_position_embeddings: opt(PositiveInt),
  rms_norm_eps: opt(Positive),
  rope_theta: opt(Positive),
  rope_scaling: opt(RopeDict),
  rope_parameters: opt(RopeDict),
  tie_word_embeddings: opt(Schema.Boolean),
  hidden_act: opt(Schema.String),
  hidden_activation: opt(Schema.String),
  sliding_window: opt(PositiveInt),
  attention_bias: opt(Schema.Boolean),
  mlp_bias: opt(Schema.Boolean),
  attention_dropout: opt(Schema.Number.check(Schema.isFinite())),
  bos_token_id: opt(NonNegativeInt),
  eos_token_id: opt(Schema.Union([NonNegativeInt, Schema.Array(NonNegativeInt)])),
  pad_token_id: opt(NonNegativeInt),
  torch_dtype: opt(Schema.String),
  dtype: opt(Schema.String),
})
type RawConfig = typeof RawConfig.Type

interface FamilyDefaults {
  readonly architecture: string
  readonly maxPositionEmbeddings: number
  readonly tieWordEmbeddings: boolean
  readonly bos: number | null
  readonly eos: number | null
  readonly pad: number | null
  /** transformers' Gemma defaults head_dim to 256 rather than hidden_size / heads. */
  readonly headDim: number | null
  /** transformers' MistralConfig defaults sliding_window to 4096 when the key is absent. */
  readonly slidingWindow: number | null
}

const families: Record<ModelType, FamilyDefaults> = {
  llama: {
    architecture: "LlamaForCausalLM",
    maxPositionEmbeddings: 2048,
    tieWordEmbeddings: false,
    bos: 1,
    eos: 2,
    pad: null,
    headDim: null,
    slidingWindow: null,
  },
  mistral: {
    architecture: "MistralForCausalLM",
    maxPositionEmbeddings: 4096 * 32,
    tieWordEmbeddings: false,
    bos: 1,
    eos: 2,
    pad: null,
    headDim: null,
    slidingWindow: 4096,
  },
  gemma: {
    architecture: "GemmaForCausalLM",
    maxPositionEmbeddings: 8192,
    tieWordEmbeddings: true,
    bos: 2,
    eos: 1,
    pad: 0,
    headDim: 256,
    slidingWindow: null,
  },
}

export const architectureOf = (modelType: ModelType): string => families[modelType].architecture

const DEFAULT_ROPE_THETA = 10_000
const DEFAULT_RMS_NORM_EPS = 1e-6

/** The first problem Schema found: the field (`rope_scaling.factor`, `eos_token_id[1]`), its value and a message. */
const firstIssue = (
  issue: SchemaIssue.Issue,
  json: unknown,
): { field: string; value: unknown; message: string } => {
  const first = SchemaIssue.makeFormatterStandardSchemaV1()(issue).issues[0]
  const keys = (first?.path ?? []).map((p) => (typeof p === "object" && p !== null && "key" in p ? p.key : p))
  const field = keys
    .map((k, i) => (typeof k === "number" ? `[${k}]` : i === 0 ? String(k) : `.${String(k)}`))
    .join("")
  const value = keys.reduce<unknown>(
    (v, k) => (typeof v === "object" && v !== null ? (v as Record<PropertyKey, unknown>)[k] : undefined),
    json,
  )
  return { field, value, message: (first?.message ?? "is invalid").replace(/\n.*/s, "") }
}

const show = (u: unknown): string => JSON.stringify(u) ?? String(u)
const isPlainObject = (u: unknown): u is Record<string, unknown> =>
  typeof u === "object" && u !== null && !Array.isArray(u)
const isModelType = (s: string): s is ModelType => (modelTypes as ReadonlyArray<string>).includes(s)

const dtypeNames: Record<string, DType> = {
  float32: "float32",
  float64: "float64",
  bfloat16: "bfloat16",
  float16: "float16",
}

interface Ctx {
  readonly source: string
}
const invalid = (ctx: Ctx, field: string, reason: string) =>
  Effect.fail(new InvalidConfig({ source: ctx.source, field, reason }))
const unsupported = (ctx: Ctx, field: string, value: unknown, supported: string) =>
  Effect.fail(new UnsupportedConfig({ source: ctx.source, field, value: show(value), supported }))

const isEmpty = (d: RopeDict | null | undefined): d is null | undefined =>
  d === null || d === undefined || Object.values(d).every((v) => v === undefined)

/**
 * The rope settings, from either spelling: transformers 4's top-level `rope_theta` plus
 * `rope_scaling`, or transformers 5's `rope_parameters`. As in transformers 5, a non-empty
 * `rope_scaling` wins over `rope_parameters`; where both say something they must agree.
 */
const parseRope = (
  ctx: Ctx,
  raw: RawConfig,
  json: Record<string, unknown>,
): Effect.Effect<RopeConfig, ConfigError> =>
  Effect.gen(function* () {
    for (const key of ["rope_scaling", "rope_parameters"])
      if (isPlainObject(json[key]))
        for (const [k, v] of Object.entries(json[key]))
          if (isPlainObject(v))
            return yield* unsupported(
              ctx,
              `${key}.${k}`,
              v,
              "one set of rope parameters shared by every layer",
            )
    const scaling = isEmpty(raw.rope_scaling) ? undefined : raw.rope_scaling
    const params = isEmpty(raw.rope_parameters) ? undefined : raw.rope_parameters
    const typeOf = (d: RopeDict, name: string) =>
      Effect.gen(function* () {
        if (d.rope_type != null && d.type != null && d.rope_type !== d.type)
          return yield* invalid(
            ctx,
            `${name}.type`,
            `is "${d.type}" but ${name}.rope_type is "${d.rope_type}"`,
          )
        return d.rope_type ?? d.type ?? "default"
      })
    const [d, name] = scaling !== undefined ? [scaling, "rope_scaling"] : [params ?? {}, "rope_parameters"]
    const type = yield* typeOf(d, name)
    if (scaling !== undefined && params !== undefined) {
      const other = yield* typeOf(params, "rope_parameters")
      if (other !== type)
        return yield* invalid(
          ctx,
          "rope_parameters.rope_type",
          `is "${other}" but rope_scaling says "${type}"`,
        )
    }
    const thetas: Array<[string, number]> = []
    for (const [field, v] of [
      [`${name}.rope_theta`, d.rope_theta],
      ["rope_parameters.rope_theta", params?.rope_theta],
      ["rope_theta", raw.rope_theta],
    ] as const)
      if (v != null) thetas.push([field, v])
    const conflict = thetas.find(([, v]) => v !== thetas[0]![1])
    if (conflict !== undefined)
      return yield* invalid(ctx, conflict[0], `is ${conflict[1]} but ${thetas[0]![0]} is ${thetas[0]![1]}`)
    const theta = thetas[0]?.[1] ?? DEFAULT_ROPE_THETA
    const partial = d.partial_rotary_factor ?? params?.partial_rotary_factor
    if (partial != null && partial !== 1)
      return yield* unsupported(
        ctx,
        `${name}.partial_rotary_factor`,
        partial,
        "1 (rotary over the whole head)",
      )
    if (type === "default") return { type: "default", theta } as const
    if (type === "llama3") {
      const need = <K extends keyof RopeDict>(key: K) =>
        d[key] != null
          ? Effect.succeed(d[key] as NonNullable<RopeDict[K]>)
          : invalid(ctx, `${name}.${key}`, `is missing; rope type "llama3" needs it`)
      const factor = yield* need("factor")
      const lowFreqFactor = yield* need("low_freq_factor")
      const highFreqFactor = yield* need("high_freq_factor")
      const originalMaxPositionEmbeddings = yield* need("original_max_position_embeddings")
      if (highFreqFactor <= lowFreqFactor)
        return yield* invalid(
          ctx,
          `${name}.high_freq_factor`,
          `is ${highFreqFactor}, not above low_freq_factor ${lowFreqFactor}`,
        )
      return {
        type: "llama3",
        theta,
        factor,
        lowFreqFactor,
        highFreqFactor,
        originalMaxPositionEmbeddings,
      } as const
    }
    const field = d.rope_type != null ? `${name}.rope_type` : `${name}.type`
    return yield* unsupported(ctx, field, type, '"default" and "llama3"')
  })

const parseAct = (
  ctx: Ctx,
  modelType: ModelType,
  raw: RawConfig,
): Effect.Effect<HiddenAct, UnsupportedConfig> => {
  if (modelType === "gemma") {
    // transformers runs Gemma with the tanh approximation even where the config says "gelu".
    const [field, value] =
      raw.hidden_activation != null
        ? ["hidden_activation", raw.hidden_activation]
        : ["hidden_act", raw.hidden_act ?? "gelu_pytorch_tanh"]
    return value === "gelu_pytorch_tanh" || value === "gelu"
      ? Effect.succeed("gelu_pytorch_tanh")
      : unsupported(ctx, field, value, '"gelu_pytorch_tanh" (or "gelu", read as it) for gemma')
  }
  const act = raw.hidden_act ?? "silu"
  return act === "silu"
    ? Effect.succeed("silu")
    : unsupported(ctx, "hidden_act", act, `"silu" for ${modelType}`)
}

/** Larger than any tensor dimension or layer count a real model has: only a corrupt config says more. */
const MAX_DIMENSION = 2 ** 31 - 1
const MAX_LAYERS = 65_536

/**
 * Sizes no model can have, checked before anything loops over layers or multiplies dimensions:
 * a corrupt num_hidden_layers of 2^53 would otherwise build parameter lists until memory ran out.
 */
const sizeProblem = (
  raw: RawConfig,
  heads: number,
  kvHeads: number,
  headDim: number,
): { field: string; reason: string } | undefined => {
  const dims: ReadonlyArray<[string, number]> = [
    ["vocab_size", raw.vocab_size],
    ["hidden_size", raw.hidden_size],
    ["intermediate_size", raw.intermediate_size],
    ["num_attention_heads", heads * headDim],
    ["num_key_value_heads", kvHeads * headDim],
    ["max_position_embeddings", raw.max_position_embeddings ?? 0],
  ]
  for (const [field, d] of dims)
    if (d > MAX_DIMENSION)
      return { field, reason: `gives a dimension of ${d}, more than ${MAX_DIMENSION}: the value is corrupt` }
  if (raw.num_hidden_layers > MAX_LAYERS)
    return {
      field: "num_hidden_layers",
      reason: `is ${raw.num_hidden_layers}, more than ${MAX_LAYERS}: the value is corrupt`,
    }
  const D = raw.hidden_size
  const perLayer = 2 * heads * headDim * D + 2 * kvHeads * headDim * D + 3 * raw.intermediate_size * D + 2 * D
  const total = raw.num_hidden_layers * perLayer + 2 * raw.vocab_size * D + D
  if (!Number.isSafeInteger(total))
    return {
      field: "hidden_size",
      reason: `with the other sizes gives ${total} parameters, more than can be counted exactly: the sizes are corrupt`,
    }
  return undefined
}

/** Parses a `config.json` object; `source` names it in errors. */
export const parseConfig = (json: unknown, source = "config.json"): Effect.Effect<ModelConfig, ConfigError> =>
  Effect.gen(function* () {
    const ctx: Ctx = { source }
    if (!isPlainObject(json)) return yield* invalid(ctx, "(root)", `is ${show(json)}, not a JSON object`)
    const supportedTypes = modelTypes.map((t) => `"${t}"`).join(", ")
    const mt = json.model_type
    if (typeof mt !== "string")
      return yield* invalid(ctx, "model_type", `is ${show(mt)}; expected one of ${supportedTypes}`)
    if (!isModelType(mt)) return yield* unsupported(ctx, "model_type", mt, supportedTypes)
    const raw = yield* Schema.decodeUnknownEffect(RawConfig)(json).pipe(
      Effect.mapError((e) => {
        const { field, value, message } = firstIssue(e.issue, json)
        const reason =
          message === "Missing key"
            ? "is required but missing"
            : `is ${show(value)}: ${message.charAt(0).toLowerCase()}${message.slice(1)}`
        return new InvalidConfig({ source, field: field || "(root)", reason })
      }),
    )
    const family = families[mt]
    if (raw.attention_bias === true) return yield* unsupported(ctx, "attention_bias", true, "false")
    if (raw.mlp_bias === true) return yield* unsupported(ctx, "mlp_bias", true, "false")
    if (raw.attention_dropout != null && raw.attention_dropout !== 0)
      return yield* unsupported(ctx, "attention_dropout", raw.attention_dropout, "0")
    const heads = raw.num_attention_heads
    const kvHeads = raw.num_key_value_heads ?? heads
    if (heads % kvHeads !== 0)
      return yield* invalid(
        ctx,
        "num_key_value_heads",
        `is ${kvHeads}, which does not divide num_attention_heads ${heads}`,
      )
    let headDim = raw.head_dim ?? family.headDim
    if (headDim == null) {
      if (raw.hidden_size % heads !== 0)
        return yield* invalid(
          ctx,
          "head_dim",
          `is absent and hidden_size ${raw.hidden_size} is not a multiple of num_attention_heads ${heads}; give head_dim`,
        )
      headDim = raw.hidden_size / heads
    }
    const tooLarge = sizeProblem(raw, heads, kvHeads, headDim)
    if (tooLarge !== undefined) return yield* invalid(ctx, tooLarge.field, tooLarge.reason)
    const dtypeField = raw.dtype != null ? "dtype" : "torch_dtype"
    const dtypeName = raw.dtype ?? raw.torch_dtype
    // An own key only: "__proto__" or "constructor" must not find Object's prototype.
    const dtype =
      dtypeName == null ? null : Object.hasOwn(dtypeNames, dtypeName) ? dtypeNames[dtypeName] : undefined
    if (dtype === undefined)
      return yield* unsupported(ctx, dtypeField, dtypeName, Object.keys(dtypeNames).join(", "))
    return {
      modelType: mt,
      vocabSize: raw.vocab_size,
      hiddenSize: raw.hidden_size,
      intermediateSize: raw.intermediate_size,
      numHiddenLayers: raw.num_hidden_layers,
      numAttentionHeads: heads,
      numKeyValueHeads: kvHeads,
      headDim,
      maxPositionEmbeddings: raw.max_position_embeddings ?? family.maxPositionEmbeddings,
      rmsNormEps: raw.rms_norm_eps ?? DEFAULT_RMS_NORM_EPS,
      rope: yield* parseRope(ctx, raw, json),
      tieWordEmbeddings: raw.tie_word_embeddings ?? family.tieWordEmbeddings,
      hiddenAct: yield* parseAct(ctx, mt, raw),
      // Only Mistral reads the key; transformers ignores it for the others.
      slidingWindow:
        mt === "mistral"
          ? raw.sliding_window === undefined
            ? family.slidingWindow
            : raw.sliding_window
          : null,
      bosTokenId: raw.bos_token_id === undefined ? family.bos : raw.bos_token_id,
      eosTokenId: raw.eos_token_id === undefined ? family.eos : raw.eos_token_id,
      padTokenId: raw.pad_token_id === undefined ? family.pad : raw.pad_token_id,
      dtype,
    } satisfies ModelConfig
  })

/** Parses the text of a `config.json`. */
export const parseConfigText = (
  text: string,
  source = "config.json",
): Effect.Effect<ModelConfig, ConfigError> =>
  Effect.suspend(() => {
    let json: unknown
    try {
      json = JSON.parse(text)
    } catch (e) {
      return invalid({ source }, "(root)", `is not JSON (${e instanceof Error ? e.message : String(e)})`)
    }
    return parseConfig(json, source)
  })

/** The end-of-sequence ids as a list. */
export const eosTokenIds = (config: ModelConfig): ReadonlyArray<number> =>
  config.eosTokenId === null
    ? []
    : typeof config.eosTokenId === "number"
      ? [config.eosTokenId]
      : config.eosTokenId

/**
 * A `config.json` object `transformers` loads: rope as transformers 5's `rope_parameters` and
 * also as `rope_theta` (+ `rope_scaling`) for transformers 4, which ignores the new key.
 */
export const configToJson = (config: ModelConfig): Record<string, unknown> => {
  const { rope } = config
  const scaling =
    rope.type === "llama3"
      ? {
          rope_type: "llama3",
          factor: rope.factor,
          low_freq_factor: rope.lowFreqFactor,
          high_freq_factor: rope.highFreqFactor,
          original_max_position_embeddings: rope.originalMaxPositionEmbeddings,
        }
      : null
  const json: Record<string, unknown> = {
    architectures: [architectureOf(config.modelType)],
    model_type: config.modelType,
    vocab_size: config.vocabSize,
    hidden_size: config.hiddenSize,
    intermediate_size: config.intermediateSize,
    num_hidden_layers: config.numHiddenLayers,
    num_attention_heads: config.numAttentionHeads,
    num_key_value_heads: config.numKeyValueHeads,
    head_dim: config.headDim,
    max_position_embeddings: config.maxPositionEmbeddings,
    rms_norm_eps: config.rmsNormEps,
    hidden_act: config.hiddenAct,
    ...(config.modelType === "gemma" ? { hidden_activation: config.hiddenAct } : {}),
    rope_parameters: { rope_type: rope.type, rope_theta: rope.theta, ...(scaling ?? {}) },
    rope_theta: rope.theta,
    rope_scaling: scaling,
    tie_word_embeddings: config.tieWordEmbeddings,
    attention_bias: false,
    attention_dropout: 0,
    ...(config.modelType === "llama" ? { mlp_bias: false } : {}),
    ...(config.modelType === "mistral" ? { sliding_window: config.slidingWindow } : {}),
    bos_token_id: config.bosTokenId,
    eos_token_id:
      config.eosTokenId === null || typeof config.eosTokenId === "number"
        ? config.eosTokenId
        : [...config.eosTokenId],
    pad_token_id: config.padTokenId,
    use_cache: true,
  }
  if (config.dtype !== null) {
    json.dtype = config.dtype
    json.torch_dtype = config.dtype
  }
  return json
}

export type ParameterShape = readonly [name: string, shape: ReadonlyArray<number>]

/**
 * The decoder's parameters with their Hugging Face names and `[out, in]` shapes, in the order
 * `transformers` registers them (and so writes them).
 */
export const parameterShapes = (config: ModelConfig): ReadonlyArray<ParameterShape> => {
  const D = config.hiddenSize
  const F = config.intermediateSize
  const q = config.numAttentionHeads * config.headDim
  const kv = config.numKeyValueHeads * config.headDim
  const out: ParameterShape[] = [["model.embed_tokens.weight", [config.vocabSize, D]]]
  for (let i = 0; i < config.numHiddenLayers; i++) {
    const p = `model.layers.${i}`
    out.push(
      [`${p}.self_attn.q_proj.weight`, [q, D]],
      [`${p}.self_attn.k_proj.weight`, [kv, D]],
      [`${p}.self_attn.v_proj.weight`, [kv, D]],
      [`${p}.self_attn.o_proj.weight`, [D, q]],
      [`${p}.mlp.gate_proj.weight`, [F, D]],
      [`${p}.mlp.up_proj.weight`, [F, D]],
      [`${p}.mlp.down_proj.weight`, [D, F]],
      [`${p}.input_layernorm.weight`, [D]],
      [`${p}.post_attention_layernorm.weight`, [D]],
    )
  }
  out.push(["model.norm.weight", [D]])
  if (!config.tieWordEmbeddings) out.push(["lm_head.weight", [config.vocabSize, D]])
  return out
}

/** Total parameter count of the decoder. */
export const parameterCount = (config: ModelConfig): number =>
  parameterShapes(config).reduce((n, [, s]) => n + s.reduce((a, b) => a * b, 1), 0)
