import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import {
  configToJson,
  eosTokenIds,
  type ModelConfig,
  parameterCount,
  parameterShapes,
  parseConfig,
  parseConfigText,
} from "../../src/core/config.ts"

const parse = (json: unknown) => Effect.runSync(parseConfig(json))
const fail = (json: unknown) => Effect.runSync(Effect.flip(parseConfig(json)))

// The config.json files as published on the Hub (trimmed of nothing: the extra fields must be ignored).
const llama2 = {
  _name_or_path: "meta-llama/Llama-2-7b-hf",
  architectures: ["LlamaForCausalLM"],
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: "silu",
  hidden_size: 4096,
  initializer_range: 0.02,
  intermediate_size: 11008,
  max_position_embeddings: 4096,
  model_type: "llama",
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 32,
  pretraining_tp: 1,
  rms_norm_eps: 1e-5,
  rope_scaling: null,
  tie_word_embeddings: false,
  torch_dtype: "float16",
  transformers_version: "4.31.0.dev0",
  use_cache: true,
  vocab_size: 32000,
}

const llama32 = {
  architectures: ["LlamaForCausalLM"],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
  head_dim: 64,
  hidden_act: "silu",
  hidden_size: 2048,
  initializer_range: 0.02,
  intermediate_size: 8192,
  max_position_embeddings: 131072,
  mlp_bias: false,
  model_type: "llama",
  num_attention_heads: 32,
  num_hidden_layers: 16,
  num_key_value_heads: 8,
  pretraining_tp: 1,
  rms_norm_eps: 1e-5,
  rope_scaling: {
    factor: 32.0,
    high_freq_factor: 4.0,
    low_freq_factor: 1.0,
    original_max_position_embeddings: 8192,
    rope_type: "llama3",
  },
  rope_theta: 500000.0,
  tie_word_embeddings: true,
  torch_dtype: "bfloat16",
  transformers_version: "4.45.0.dev0",
  use_cache: true,
  vocab_size: 128256,
}

const mistral = {
  architectures: ["MistralForCausalLM"],
  bos_token_id: 1,
  eos_token_id: 2,
  hidden_act: "silu",
  hidden_size: 4096,
  initializer_range: 0.02,
  intermediate_size: 14336,
  max_position_embeddings: 32768,
  model_type: "mistral",
  num_attention_heads: 32,
  num_hidden_layers: 32,
  num_key_value_heads: 8,
  rms_norm_eps: 1e-5,
  rope_theta: 10000.0,
  sliding_window: 4096,
  tie_word_embeddings: false,
  torch_dtype: "bfloat16",
  transformers_version: "4.34.0.dev0",
  use_cache: true,
  vocab_size: 32000,
}

const gemma = {
  architectures: ["GemmaForCausalLM"],
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: 2,
  eos_token_id: 1,
  head_dim: 256,
  hidden_act: "gelu_pytorch_tanh",
  hidden_activation: "gelu_pytorch_tanh",
  hidden_size: 2048,
  initializer_range: 0.02,
  intermediate_size: 16384,
  max_position_embeddings: 8192,
  model_type: "gemma",
  num_attention_heads: 8,
  num_hidden_layers: 18,
  num_key_value_heads: 1,
  pad_token_id: 0,
  rms_norm_eps: 1e-6,
  rope_scaling: null,
  rope_theta: 10000.0,
  torch_dtype: "bfloat16",
  transformers_version: "4.38.0.dev0",
  use_cache: true,
  vocab_size: 256000,
}

// transformers 5 spelling: rope_parameters in place of rope_theta / rope_scaling, dtype for torch_dtype.
const llama32v5 = (() => {
  const { rope_scaling: _s, rope_theta: _t, torch_dtype: _d, ...rest } = llama32
  return {
    ...rest,
    dtype: "bfloat16",
    rope_parameters: {
      rope_type: "llama3",
      rope_theta: 500000.0,
      factor: 32.0,
      low_freq_factor: 1.0,
      high_freq_factor: 4.0,
      original_max_position_embeddings: 8192,
    },
    transformers_version: "5.0.0",
  }
})()

const roundTrips = (c: ModelConfig) => expect(parse(JSON.parse(JSON.stringify(configToJson(c))))).toEqual(c)

describe("parseConfig", () => {
  it("reads a Llama 2 config: theta 10000, no scaling, defaults filled", () => {
    const c = parse(llama2)
    expect(c).toEqual({
      modelType: "llama",
      vocabSize: 32000,
      hiddenSize: 4096,
      intermediateSize: 11008,
      numHiddenLayers: 32,
      numAttentionHeads: 32,
      numKeyValueHeads: 32,
      headDim: 128,
      maxPositionEmbeddings: 4096,
      rmsNormEps: 1e-5,
      rope: { type: "default", theta: 10000 },
      tieWordEmbeddings: false,
      hiddenAct: "silu",
      slidingWindow: null,
      bosTokenId: 1,
      eosTokenId: 2,
      padTokenId: null,
      dtype: "float16",
    })
    expect(parameterCount(c)).toBe(6_738_415_616)
    roundTrips(c)
  })

  it("reads a Llama 3.2 config with llama3 rope scaling", () => {
    const c = parse(llama32)
    expect(c.rope).toEqual({
      type: "llama3",
      theta: 500000,
      factor: 32,
      lowFreqFactor: 1,
      highFreqFactor: 4,
      originalMaxPositionEmbeddings: 8192,
    })
    expect(c).toMatchObject({ numKeyValueHeads: 8, headDim: 64, tieWordEmbeddings: true, dtype: "bfloat16" })
    expect(eosTokenIds(c)).toEqual([128001, 128008, 128009])
    expect(parameterCount(c)).toBe(1_235_814_400)
    roundTrips(c)
  })

  it("reads the transformers 5 spelling (rope_parameters, dtype) the same way", () => {
    expect(parse(llama32v5)).toEqual(parse(llama32))
    const d = parse({ ...llama2, rope_parameters: { rope_type: "default", rope_theta: 10000 } })
    expect(d.rope).toEqual({ type: "default", theta: 10000 })
    // The older "type" alias of rope_type
    expect(
      parse({ ...llama32, rope_scaling: { ...llama32.rope_scaling, rope_type: undefined, type: "llama3" } })
        .rope,
    ).toEqual(parse(llama32).rope)
    expect(parse({ ...llama2, rope_scaling: { type: "default" } }).rope.type).toBe("default")
  })

  it("reads a Mistral config with a sliding window", () => {
    const c = parse(mistral)
    expect(c).toMatchObject({ modelType: "mistral", slidingWindow: 4096, numKeyValueHeads: 8, headDim: 128 })
    expect(c.rope).toEqual({ type: "default", theta: 10000 })
    expect(parse({ ...mistral, sliding_window: null }).slidingWindow).toBeNull()
    // transformers' MistralConfig default when the key is absent
    const { sliding_window: _w, ...noWindow } = mistral
    expect(parse(noWindow).slidingWindow).toBe(4096)
    roundTrips(c)
    roundTrips(parse({ ...mistral, sliding_window: null }))
  })

  it("reads a Gemma config: head_dim 256, tanh GeLU, tied embeddings", () => {
    const c = parse(gemma)
    expect(c).toMatchObject({
      modelType: "gemma",
      headDim: 256,
      numKeyValueHeads: 1,
      hiddenAct: "gelu_pytorch_tanh",
      tieWordEmbeddings: true,
      bosTokenId: 2,
      eosTokenId: 1,
      padTokenId: 0,
    })
    // Early Gemma configs say "gelu"; transformers runs the tanh approximation.
    const { hidden_activation: _a, ...old } = gemma
    expect(parse({ ...old, hidden_act: "gelu" }).hiddenAct).toBe("gelu_pytorch_tanh")
    // Gemma's head_dim default is 256, not hidden_size / heads.
    const { head_dim: _h, ...noHeadDim } = gemma
    expect(parse(noHeadDim).headDim).toBe(256)
    roundTrips(c)
    expect(configToJson(c)).toMatchObject({
      architectures: ["GemmaForCausalLM"],
      hidden_activation: "gelu_pytorch_tanh",
    })
  })

  it("fills the defaults transformers uses", () => {
    const minimal = {
      model_type: "llama",
      vocab_size: 100,
      hidden_size: 64,
      intermediate_size: 128,
      num_hidden_layers: 2,
      num_attention_heads: 4,
    }
    expect(parse(minimal)).toEqual({
      modelType: "llama",
      vocabSize: 100,
      hiddenSize: 64,
      intermediateSize: 128,
      numHiddenLayers: 2,
      numAttentionHeads: 4,
      numKeyValueHeads: 4,
      headDim: 16,
      maxPositionEmbeddings: 2048,
      rmsNormEps: 1e-6,
      rope: { type: "default", theta: 10000 },
      tieWordEmbeddings: false,
      hiddenAct: "silu",
      slidingWindow: null,
      bosTokenId: 1,
      eosTokenId: 2,
      padTokenId: null,
      dtype: null,
    })
    expect(parse({ ...minimal, model_type: "gemma" }).tieWordEmbeddings).toBe(true)
    expect(parse({ ...minimal, tie_word_embeddings: true, num_key_value_heads: null }).numKeyValueHeads).toBe(
      4,
    )
  })

  it("writes a config transformers 4 and 5 both read", () => {
    const json = configToJson(parse(llama32))
    expect(json).toMatchObject({
      architectures: ["LlamaForCausalLM"],
      model_type: "llama",
      rope_theta: 500000,
      rope_parameters: {
        rope_type: "llama3",
        rope_theta: 500000,
        factor: 32,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 8192,
      },
      rope_scaling: { rope_type: "llama3", factor: 32 },
      eos_token_id: [128001, 128008, 128009],
      torch_dtype: "bfloat16",
      dtype: "bfloat16",
      tie_word_embeddings: true,
      attention_bias: false,
    })
    expect(configToJson(parse(llama2))).toMatchObject({
      rope_parameters: { rope_type: "default", rope_theta: 10000 },
      rope_scaling: null,
    })
    expect(configToJson(parse(mistral))).toMatchObject({
      architectures: ["MistralForCausalLM"],
      sliding_window: 4096,
    })
  })

  it("parses config text, failing on bad JSON", () => {
    expect(Effect.runSync(parseConfigText(JSON.stringify(llama2))).hiddenSize).toBe(4096)
    const e = Effect.runSync(Effect.flip(parseConfigText("{ nope", "/models/x/config.json")))
    expect(e._tag).toBe("InvalidConfig")
    expect(e.message).toContain("/models/x/config.json")
  })
})

describe("unsupported or invalid configs", () => {
  const unsupported: Array<[string, unknown, string, string]> = [
    [
      "rope type yarn",
      { ...llama2, rope_scaling: { rope_type: "yarn", factor: 4 } },
      "rope_scaling.rope_type",
      "yarn",
    ],
    [
      "rope type dynamic (old alias)",
      { ...llama2, rope_scaling: { type: "dynamic", factor: 2 } },
      "rope_scaling.type",
      "dynamic",
    ],
    [
      "rope type linear",
      { ...llama2, rope_parameters: { rope_type: "linear", factor: 2 } },
      "rope_parameters.rope_type",
      "linear",
    ],
    ["attention_bias true", { ...llama2, attention_bias: true }, "attention_bias", "true"],
    ["mlp_bias true", { ...llama2, mlp_bias: true }, "mlp_bias", "true"],
    ["attention_dropout 0.1", { ...llama2, attention_dropout: 0.1 }, "attention_dropout", "0.1"],
    ["model_type gpt2", { model_type: "gpt2", n_embd: 768, n_layer: 12 }, "model_type", "gpt2"],
    ["hidden_act gelu for llama", { ...llama2, hidden_act: "gelu" }, "hidden_act", "gelu"],
    [
      "hidden_activation relu for gemma",
      { ...gemma, hidden_activation: "relu" },
      "hidden_activation",
      "relu",
    ],
    [
      "partial rotary",
      { ...llama2, rope_parameters: { rope_type: "default", partial_rotary_factor: 0.5 } },
      "partial_rotary_factor",
      "0.5",
    ],
    [
      "per-layer rope",
      { ...llama2, rope_parameters: { full_attention: { rope_type: "default" } } },
      "rope_parameters.full_attention",
      "rope",
    ],
    ["a float8 dtype", { ...llama2, torch_dtype: "float8_e4m3fn" }, "torch_dtype", "float8_e4m3fn"],
  ]
  for (const [what, json, field, value] of unsupported)
    it(`refuses ${what} with UnsupportedConfig`, () => {
      const e = fail(json)
      expect(e._tag).toBe("UnsupportedConfig")
      expect(e.message).toContain(field)
      expect(e.message).toContain(value)
      expect(e.message).toContain("supported:")
    })

  const { vocab_size: _v, ...noVocab } = llama2
  const invalid: Array<[string, unknown, string]> = [
    ["a missing required field", noVocab, "vocab_size"],
    ["a string where a number belongs", { ...llama2, hidden_size: "4096" }, "hidden_size"],
    ["a fractional layer count", { ...llama2, num_hidden_layers: 2.5 }, "num_hidden_layers"],
    ["a negative eps", { ...llama2, rms_norm_eps: -1 }, "rms_norm_eps"],
    ["a bad eos list", { ...llama2, eos_token_id: [1, "x"] }, "eos_token_id[1]"],
    ["a boolean given as a string", { ...llama2, tie_word_embeddings: "false" }, "tie_word_embeddings"],
    ["a model_type that is not a string", { ...llama2, model_type: 3 }, "model_type"],
    ["kv heads that do not divide heads", { ...llama2, num_key_value_heads: 5 }, "num_key_value_heads"],
    [
      "heads that do not divide hidden_size",
      { ...llama2, num_attention_heads: 3, num_key_value_heads: 3 },
      "head_dim",
    ],
    [
      "llama3 rope without its parameters",
      { ...llama32, rope_scaling: { rope_type: "llama3", factor: 8 } },
      "rope_scaling.low_freq_factor",
    ],
    [
      "llama3 rope with high <= low",
      { ...llama32, rope_scaling: { ...llama32.rope_scaling, high_freq_factor: 1 } },
      "rope_scaling.high_freq_factor",
    ],
    [
      "conflicting rope thetas",
      { ...llama2, rope_theta: 10000, rope_parameters: { rope_type: "default", rope_theta: 500000 } },
      "rope_theta",
    ],
    [
      "rope_scaling and rope_parameters that disagree",
      { ...llama32v5, rope_scaling: { rope_type: "default" } },
      "rope_parameters.rope_type",
    ],
    [
      "a rope factor that is not a number",
      { ...llama32, rope_scaling: { ...llama32.rope_scaling, factor: "32" } },
      "rope_scaling.factor",
    ],
    ["a config that is not an object", [1, 2], "(root)"],
  ]
  for (const [what, json, field] of invalid)
    it(`refuses ${what} with InvalidConfig naming the field`, () => {
      const e = fail(json)
      expect(e._tag).toBe("InvalidConfig")
      expect(e.message).toContain(`"${field}"`)
      expect(e.message).toContain("config.json")
    })
})

describe("parameterShapes", () => {
  const tiny = parse({
    model_type: "llama",
    vocab_size: 50,
    hidden_size: 16,
    intermediate_size: 40,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 8,
  })

  it("lists the Hugging Face names with [out, in] shapes", () => {
    const shapes = new Map(parameterShapes(tiny))
    expect(shapes.size).toBe(1 + 2 * 9 + 1 + 1)
    expect(shapes.get("model.embed_tokens.weight")).toEqual([50, 16])
    expect(shapes.get("model.layers.1.input_layernorm.weight")).toEqual([16])
    expect(shapes.get("model.layers.0.self_attn.q_proj.weight")).toEqual([32, 16])
    expect(shapes.get("model.layers.0.self_attn.k_proj.weight")).toEqual([16, 16])
    expect(shapes.get("model.layers.0.self_attn.v_proj.weight")).toEqual([16, 16])
    expect(shapes.get("model.layers.0.self_attn.o_proj.weight")).toEqual([16, 32])
    expect(shapes.get("model.layers.0.post_attention_layernorm.weight")).toEqual([16])
    expect(shapes.get("model.layers.0.mlp.gate_proj.weight")).toEqual([40, 16])
    expect(shapes.get("model.layers.0.mlp.up_proj.weight")).toEqual([40, 16])
    expect(shapes.get("model.layers.1.mlp.down_proj.weight")).toEqual([16, 40])
    expect(shapes.get("model.norm.weight")).toEqual([16])
    expect(shapes.get("lm_head.weight")).toEqual([50, 16])
    const names = parameterShapes(tiny).map(([n]) => n)
    expect(names[0]).toBe("model.embed_tokens.weight")
    expect(names.at(-1)).toBe("lm_head.weight")
    expect(names.indexOf("model.layers.0.mlp.down_proj.weight")).toBeLessThan(
      names.indexOf("model.layers.1.self_attn.q_proj.weight"),
    )
  })

  it("leaves out lm_head when embeddings are tied", () => {
    const names = parameterShapes({ ...tiny, tieWordEmbeddings: true }).map(([n]) => n)
    expect(names).not.toContain("lm_head.weight")
    expect(names.at(-1)).toBe("model.norm.weight")
  })
})
