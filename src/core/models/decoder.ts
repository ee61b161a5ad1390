/**
 * The decoder shared by Llama, Mistral and Gemma, written once as a forward pass over parameters
 * with Hugging Face names: y = f(x | θ). The family is configuration: Gemma scales embeddings by
 * √D, normalises with (1 + w) and gates with tanh-GELU; Mistral attends within a sliding window.
 * Sharding never appears here: the ops follow whatever shardings the parameters and batch have.
 */

import { Effect, Schema } from "effect"
import { boxArgs } from "../backend.ts"
import type { ModelConfig, ModelType } from "../config.ts"
import { parameterShapes } from "../config.ts"
import type { DType } from "../dtype.ts"
import { itemSize } from "../dtype.ts"
import type { Engine } from "../engine.ts"
import type { LoraParams } from "../lora.ts"
import type { Mesh } from "../mesh.ts"
import { attention } from "../ops/attention.ts"
import { crossEntropyLoss } from "../ops/crossEntropy.ts"
import { add, castTo, scale } from "../ops/elementwise.ts"
import { embedding } from "../ops/embedding.ts"
import { type GluActivation, glu } from "../ops/glu.ts"
import { mergeHeads, splitHeads } from "../ops/heads.ts"
import { toLayout } from "../ops/layout.ts"
import { linear } from "../ops/linear.ts"
import { statsDtype } from "../ops/local.ts"
import { rmsnorm } from "../ops/rmsnorm.ts"
import { rope } from "../ops/rope.ts"
import { matchRule, type PartitionRules, specFor } from "../partitionRules.ts"
import { remat } from "../remat.ts"
import { allocateArray, fromHost, type ShardedArray } from "../shardedArray.ts"
import { NamedSharding, P } from "../sharding.ts"
import { ropeInverseFrequencies } from "./ropeFrequencies.ts"

/** Parameters by Hugging Face name ("model.layers.0.self_attn.q_proj.weight"). */
export type Params = Readonly<Record<string, ShardedArray>>

/** What the decoder reads: token ids and their positions, [B, T] int32, and an optional key mask. */
export interface DecoderInputs {
  readonly inputIds: ShardedArray
  readonly positions: ShardedArray
  /** [B, T] uint8, 1 where a token may be attended (0 on padding). */
  readonly keyMask?: ShardedArray
}

/**
 * Keys and values of every layer for decoding: [B, maxLength, Hkv, hd] each, filled up to
 * `length`. `keyMask` [B, maxLength] marks the positions that may be attended (left padding 0).
 */
export interface KVCache {
  readonly maxLength: number
  length: number
  readonly keyMask: ShardedArray
  readonly layers: Array<{ k: ShardedArray; v: ShardedArray } | undefined>
}

/** A LoRA adapter applied on the fly: y = x·Wᵀ + (alpha / r)·(x·Aᵀ)·Bᵀ. */
export interface LoraAdapter {
  readonly params: LoraParams
  readonly alpha: number
}

export interface ForwardOptions {
  readonly cache?: KVCache
  readonly lora?: LoraAdapter
  /**
   * Recompute each layer's activations in the backward pass instead of keeping them (activation
   * checkpointing, as `gradient_checkpointing` in transformers): memory for one layer's input per
   * layer, at the cost of a second forward pass of every layer. Ignored outside a gradient.
   */
  readonly remat?: boolean
}

/** A training batch on the mesh: next-token targets (< 0 ignored) and per-token loss weights. */
export interface TokenBatch extends DecoderInputs {
  readonly targets: ShardedArray
  /** [B, T] in the compute dtype: 1/(counted targets in the global batch) for a mean loss. */
  readonly rowScale: ShardedArray
}

export class ModelTypeMismatch extends Schema.TaggedError<ModelTypeMismatch>()("ModelTypeMismatch", {
  expected: Schema.String,
  got: Schema.String,
}) {
  override get message() {
    return `this model class is for model_type "${this.expected}" but the config says "${this.got}": use the matching class or --model-type`
  }
}

export class HeadsNotDivisible extends Schema.TaggedError<HeadsNotDivisible>()("HeadsNotDivisible", {
  parameter: Schema.String,
  rule: Schema.String,
  axes: Schema.Array(Schema.String),
  parts: Schema.Number,
  heads: Schema.Number,
}) {
  override get message() {
    return (
      `${this.parameter}: its rule ${this.rule} splits ${this.heads} heads over mesh axes (${this.axes.join(", ")}) ` +
      `of size ${this.parts}, which does not divide them; use a mesh whose model axis divides ${this.heads} or change the rule`
    )
  }
}

export const gluActivation = (config: ModelConfig): GluActivation =>
  config.hiddenAct === "silu" ? "silu" : "gelu_tanh"

/** Mesh axes the batch is split over: "data" where the mesh has it. */
export const batchAxes = (mesh: Mesh): string[] => (mesh.hasAxis("data") ? ["data"] : [])

export class CausalLM {
  /** The model_type this class implements. */
  static readonly modelType: ModelType = "llama"
  /** Magix's rules for the Hugging Face [out, in] layout: FSDP over data, tensor parallel over model. */
  static readonly partitionRules: PartitionRules = [
    ["embed_tokens", P("data", "model")],
    ["lm_head", P("model", "data")],
    ["self_attn\\.(q|k|v)_proj", P("model", "data")],
    ["self_attn\\.o_proj", P("data", "model")],
    ["mlp\\.(gate|up)_proj", P("model", "data")],
    ["mlp\\.down_proj", P("data", "model")],
  ]

  private readonly invFreq = new Map<string, ShardedArray>()
  /**
   * The dtype activations and matmul inputs are computed in: float32 (the CPU reference) or
   * bfloat16 (CUDA mixed precision, with float32 master weights cast on use).
   */
  computeDtype: DType = "float32"

  constructor(readonly config: ModelConfig) {}

  get modelType(): ModelType {
    return this.config.modelType
  }

  /** Every parameter with its shape, in the order transformers registers them. */
  get parameterShapes() {
    return parameterShapes(this.config)
  }

  /** The weight the loss head multiplies by: lm_head, or the embedding when tied. */
  headWeightName(): string {
    return this.config.tieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight"
  }

  /**
   * Checks that a rule set splits attention heads evenly on this mesh (it can place weights whose
   * head count it cannot split: the error names the rule and the axes).
   */
  checkSharding(rules: PartitionRules, mesh: Mesh): Effect.Effect<void, HeadsNotDivisible> {
    const c = this.config
    const batch = batchAxes(mesh)
    const checks: Array<[string, number, number]> = [
      ["self_attn.q_proj.weight", 0, c.numAttentionHeads],
      ["self_attn.k_proj.weight", 0, c.numKeyValueHeads],
      ["self_attn.v_proj.weight", 0, c.numKeyValueHeads],
      ["self_attn.o_proj.weight", 1, c.numAttentionHeads],
    ]
    return Effect.gen(function* () {
      for (const [suffix, dim, heads] of checks) {
        const parameter = `model.layers.0.${suffix}`
        const spec = specFor(rules, parameter, [1, 1]).padTo(2)
        const axes = spec.entries[dim]!.filter((a) => mesh.hasAxis(a) && !batch.includes(a))
        const parts = axes.reduce((p, a) => p * mesh.axisSize(a), 1)
        if (heads % parts !== 0) {
          const m = matchRule(rules, parameter)!
          return yield* new HeadsNotDivisible({
            parameter,
            rule: `${String(rules[m.index]![0])} → ${m.spec}`,
            axes,
            parts,
            heads,
          })
        }
      }
    })
  }

  private frequencies(mesh: Mesh, dtype: DType, engine: Engine): ShardedArray {
    const key = `${mesh.devices.join(",")}|${mesh.shape.join(",")}|${dtype}`
    let f = this.invFreq.get(key)
    if (!f || f.isDisposed) {
      const host = ropeInverseFrequencies(this.config.rope, this.config.headDim)
      const data = dtype === "float64" ? host : Float32Array.from(host)
      f = engine.untracked(() =>
        Effect.runSync(
          fromHost(engine, data, [host.length], dtype, new NamedSharding(mesh, P()), "rope frequencies"),
        ),
      )
      this.invFreq.set(key, f)
    }
    return f
  }

  /** Frees the model's own device arrays (rope tables). */
  dispose(): void {
    for (const f of this.invFreq.values()) f.dispose()
    this.invFreq.clear()
  }

  /**
   * The final hidden states [B, T, D], after the last norm. With a cache, the tokens continue the
   * cached sequence: their keys and values are appended and attention reads the whole cache.
   */
  forward(params: Params, inputs: DecoderInputs, options: ForwardOptions = {}): ShardedArray {
    const { cache, lora } = options
    const c = this.config
    const gemma = c.modelType === "gemma"
    const offset = gemma ? 1 : 0
    const p = (name: string) => {
      const w = params[name]
      if (!w) throw new Error(`missing parameter ${name}`)
      return castTo(w, this.computeDtype)
    }
    const proj = (x: ShardedArray, name: string) => {
      const y = linear(x, p(name))
      const a = lora?.params[`${name}.lora_A`]
      const b = lora?.params[`${name}.lora_B`]
      if (!a || !b || !lora) return y
      return add(toLayout(y, y.spec), scale(linear(linear(x, a), b), lora.alpha / a.shape[0]!))
    }
    let h = embedding(inputs.inputIds, p("model.embed_tokens.weight"))
    h = toLayout(h, h.spec)
    // transformers multiplies by √D rounded to the activations' dtype.
    if (gemma) h = scale(h, Math.fround(Math.sqrt(c.hiddenSize)))
    // float32 tables under bfloat16 compute: bfloat16 angles drift at long positions.
    const freqs = this.frequencies(h.mesh, statsDtype(h.dtype), h.engine)
    const act = gluActivation(c)
    const layer = (i: number, h: ShardedArray): ShardedArray => {
      const pre = `model.layers.${i}.`
      const a = rmsnorm(h, p(`${pre}input_layernorm.weight`), c.rmsNormEps, offset)
      const q = rope(
        splitHeads(linear(a, p(`${pre}self_attn.q_proj.weight`)), c.numAttentionHeads),
        inputs.positions,
        freqs,
      )
      const k = rope(
        splitHeads(linear(a, p(`${pre}self_attn.k_proj.weight`)), c.numKeyValueHeads),
        inputs.positions,
        freqs,
      )
      const v = splitHeads(linear(a, p(`${pre}self_attn.v_proj.weight`)), c.numKeyValueHeads)
      const window = c.slidingWindow ?? 0
      const o = cache
        ? attention(q, ...appendToCache(cache, i, k, v), {
            causal: true,
            window,
            keyMask: cache.keyMask,
            queryOffset: cache.length,
            keyLength: cache.length + q.shape[1]!,
          })
        : attention(q, k, v, { causal: true, window, ...(inputs.keyMask ? { keyMask: inputs.keyMask } : {}) })
      const r = add(h, proj(mergeHeads(o), `${pre}self_attn.o_proj.weight`))
      const m = rmsnorm(r, p(`${pre}post_attention_layernorm.weight`), c.rmsNormEps, offset)
      const f = glu(proj(m, `${pre}mlp.gate_proj.weight`), proj(m, `${pre}mlp.up_proj.weight`), act)
      return add(r, proj(f, `${pre}mlp.down_proj.weight`))
    }
    for (let i = 0; i < c.numHiddenLayers; i++) {
      if (options.remat && !cache) {
        // Everything the layer may differentiate: its input, its weights and its LoRA pairs.
        const pre = `model.layers.${i}.`
        const own = (table: Readonly<Record<string, ShardedArray>> | undefined) =>
          Object.entries(table ?? {})
            .filter(([k]) => k.startsWith(pre))
            .map(([, a]) => a)
        const x = h
        h = remat([x, ...own(params), ...own(lora?.params)], () => layer(i, x))
      } else h = layer(i, h)
    }
    if (cache) cache.length += inputs.inputIds.shape[1]!
    return rmsnorm(h, p("model.norm.weight"), c.rmsNormEps, offset)
  }

  /** Mean next-token cross-entropy, with the output projection fused into the loss. */
  loss(params: Params, batch: TokenBatch, options: ForwardOptions = {}): ShardedArray {
    const hidden = this.forward(params, batch, options)
    const head = params[this.headWeightName()]
    if (!head) throw new Error(`missing parameter ${this.headWeightName()}`)
    return crossEntropyLoss(hidden, castTo(head, this.computeDtype), batch.targets, batch.rowScale)
  }

  /** Logits [B, T, V] of some hidden states (for generation: a few positions at a time). */
  logits(params: Params, hidden: ShardedArray): ShardedArray {
    const head = params[this.headWeightName()]
    if (!head) throw new Error(`missing parameter ${this.headWeightName()}`)
    const y = linear(hidden, castTo(head, this.computeDtype))
    return toLayout(y, y.spec)
  }
}

/** Writes a layer's new keys and values at the cache's current length (allocating it on first use). */
const appendToCache = (
  cache: KVCache,
  layer: number,
  k: ShardedArray,
  v: ShardedArray,
): [ShardedArray, ShardedArray] => {
  const [B, T, H, hd] = k.shape as [number, number, number, number]
  if (T + cache.length > cache.maxLength) throw new Error("KV cache: sequence longer than the cache")
  let entry = cache.layers[layer]
  if (!entry) {
    const make = (x: ShardedArray) =>
      k.engine.untracked(() => allocateArray(x.engine, [B, cache.maxLength, H, hd], x.dtype, x.sharding))
    entry = { k: make(k), v: make(v) }
    cache.layers[layer] = entry
  }
  for (const [src, dst] of [
    [k, entry.k],
    [v, entry.v],
  ] as const) {
    if (!src.spec.padTo(4).equals(dst.spec.padTo(4)))
      throw new Error("KV cache: keys changed layout between steps")
    const local = src.localShape
    const dstLocal = dst.localShape
    for (let pos = 0; pos < src.mesh.size; pos++)
      src.engine.backend.exec(
        "copy_box",
        [src.buffer(pos), dst.buffer(pos)],
        [itemSize(src.dtype), ...boxArgs(local, [0, 0, 0, 0], dstLocal, [0, cache.length, 0, 0], local)],
      )
  }
  return [entry.k, entry.v]
}

/** Frees a cache's arrays. */
export const disposeCache = (cache: KVCache): void => {
  cache.keyMask.dispose()
  for (const l of cache.layers) {
    l?.k.dispose()
    l?.v.dispose()
  }
}

export class LlamaForCausalLM extends CausalLM {
  static override readonly modelType: ModelType = "llama"
}

export class MistralForCausalLM extends CausalLM {
  static override readonly modelType: ModelType = "mistral"
}

export class GemmaForCausalLM extends CausalLM {
  static override readonly modelType: ModelType = "gemma"
}

/** A model class: `new Model(config)`, with its model type and default rules. */
export interface CausalLMClass {
  new (config: ModelConfig): CausalLM
  readonly modelType: ModelType
  readonly partitionRules: PartitionRules
}

export const modelClasses: Readonly<Record<ModelType, CausalLMClass>> = {
  llama: LlamaForCausalLM,
  mistral: MistralForCausalLM,
  gemma: GemmaForCausalLM,
}

/** Builds a model of class `Model` from a parsed config, checking the model type. */
export const makeModel = (
  Model: CausalLMClass,
  config: ModelConfig,
): Effect.Effect<CausalLM, ModelTypeMismatch> =>
  config.modelType === Model.modelType
    ? Effect.succeed(new Model(config))
    : Effect.fail(new ModelTypeMismatch({ expected: Model.modelType, got: config.modelType }))

/** The model class for a `--model-type` name. */
export const modelClassFor = (modelType: ModelType): CausalLMClass => modelClasses[modelType]
