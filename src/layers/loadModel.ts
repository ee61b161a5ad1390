/**
 * Magix's load_model_hub: fetch a Hugging Face model (Hub id or local directory), build the model
 * from its config.json, and place every parameter on the mesh straight from the safetensors byte
 * ranges of each device's slice. No parameter is ever assembled whole on the host: one block is
 * in memory at a time. The parameters are released when the caller's scope closes.
 */
import { readFile } from "node:fs/promises"
import { join } from "node:path"
import { Effect, Schema } from "effect"
import { parseConfigText } from "../core/config.ts"
import { convertHost, type DType, itemSize } from "../core/dtype.ts"
import type { Mesh } from "../core/mesh.ts"
import { type CausalLM, type CausalLMClass, makeModel, type Params } from "../core/models/decoder.ts"
import { type PartitionRules, specFor } from "../core/partitionRules.ts"
import { formatShape, numel } from "../core/shape.ts"
import { makeArrayFromSlices, type ShardedArray } from "../core/shardedArray.ts"
import { NamedSharding } from "../core/sharding.ts"
import { Devices } from "./Devices.ts"
import { Hub } from "./Hub.ts"
import { openModelWeights } from "./SafetensorsFile.ts"

export class MissingParameter extends Schema.TaggedError<MissingParameter>()("MissingParameter", {
  model: Schema.String,
  parameter: Schema.String,
}) {
  override get message() {
    return `${this.model}: the checkpoint has no tensor ${this.parameter}, which this model type needs; check --model-type and the checkpoint`
  }
}

export class ParameterShapeMismatch extends Schema.TaggedError<ParameterShapeMismatch>()(
  "ParameterShapeMismatch",
  {
    model: Schema.String,
    parameter: Schema.String,
    expected: Schema.Array(Schema.Number),
    got: Schema.Array(Schema.Number),
  },
) {
  override get message() {
    return `${this.model}: ${this.parameter} is ${formatShape(this.got)} in the checkpoint but config.json implies ${formatShape(this.expected)}`
  }
}

export class ConfigFileUnreadable extends Schema.TaggedError<ConfigFileUnreadable>()("ConfigFileUnreadable", {
  path: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `cannot read ${this.path} (${this.detail}): a model directory needs a config.json`
  }
}

export interface LoadOptions {
  /** The dtype parameters are kept in (float32 by default; bfloat16 with --bf16-model-weights). */
  readonly dtype?: DType
  readonly revision?: string
  /** Filled with the largest host block held at once, so tests can check memory stays bounded. */
  readonly stats?: { maxHostBlockBytes: number; bytesRead: number }
}

const weightFiles = ["config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json"]

/** Reads a model directory's config.json into a model of class `Model`. */
export const loadModelConfig = (Model: CausalLMClass, dir: string) =>
  Effect.gen(function* () {
    const path = join(dir, "config.json")
    const text = yield* Effect.tryPromise({
      try: () => readFile(path, "utf8"),
      catch: (e) => new ConfigFileUnreadable({ path, detail: e instanceof Error ? e.message : String(e) }),
    })
    const config = yield* parseConfigText(text, path)
    return yield* makeModel(Model, config)
  })

/** Places every parameter of `model` from the safetensors files in `dir`. */
export const loadParams = (
  model: CausalLM,
  dir: string,
  rules: PartitionRules,
  mesh: Mesh,
  options: LoadOptions = {},
) =>
  Effect.gen(function* () {
    const { engine } = yield* Devices
    yield* model.checkSharding(rules, mesh)
    const dtype = options.dtype ?? "float32"
    const params: Record<string, ShardedArray> = {}
    const release = () => {
      for (const p of Object.values(params)) p.dispose()
    }
    yield* Effect.scoped(
      Effect.gen(function* () {
        const weights = yield* openModelWeights(dir)
        for (const [name, shape] of model.parameterShapes) {
          const entry = yield* weights
            .entry(name)
            .pipe(
              Effect.catchTag("TensorNotFound", () =>
                Effect.fail(new MissingParameter({ model: dir, parameter: name })),
              ),
            )
          if (entry.shape.length !== shape.length || entry.shape.some((d, i) => d !== shape[i]))
            return yield* new ParameterShapeMismatch({
              model: dir,
              parameter: name,
              expected: [...shape],
              got: [...entry.shape],
            })
          params[name] = yield* makeArrayFromSlices(
            engine,
            shape,
            dtype,
            new NamedSharding(mesh, specFor(rules, name, shape)),
            (slice) =>
              Effect.map(weights.readSlice(name, slice), (block) => {
                if (options.stats) {
                  const held =
                    block.byteLength + numel(slice.shape) * (entry.dtype === dtype ? 0 : itemSize(dtype))
                  options.stats.maxHostBlockBytes = Math.max(options.stats.maxHostBlockBytes, held)
                }
                return convertHost(block, entry.dtype, dtype)
              }),
            name,
          )
        }
        if (options.stats) options.stats.bytesRead = yield* weights.bytesRead
      }),
    ).pipe(Effect.onError(() => Effect.sync(release)))
    return params as Params
  })

/**
 * `loadModelHub(LlamaForCausalLM, "meta-llama/Llama-3.2-1B", LlamaForCausalLM.partitionRules, mesh)`:
 * the model and its parameters, sharded by the rules. The parameters live until the scope closes.
 */
export const loadModelHub = (
  Model: CausalLMClass,
  nameOrPath: string,
  rules: PartitionRules,
  mesh: Mesh,
  options: LoadOptions = {},
) =>
  Effect.gen(function* () {
    const hub = yield* Hub
    const dir = yield* hub.snapshot(nameOrPath, {
      allowPatterns: weightFiles,
      ...(options.revision ? { revision: options.revision } : {}),
    })
    const model = yield* loadModelConfig(Model, dir)
    const params = yield* Effect.acquireRelease(loadParams(model, dir, rules, mesh, options), (p) =>
      Effect.sync(() => {
        for (const a of Object.values(p)) a.dispose()
        model.dispose()
      }),
    )
    return { model, params, directory: dir }
  })

export type LoadedModel = { readonly model: CausalLM; readonly params: Params; readonly directory: string }
