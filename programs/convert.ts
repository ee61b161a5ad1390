/**
 * `magix convert`: a checkpoint step to the Hugging Face layout transformers loads (config.json +
 * model.safetensors, sharded with an index above --max-shard-size, float32 or bfloat16), or a
 * Hugging Face model (Hub id or directory) into a checkpoint that `magix train` resumes from.
 */
import { resolve } from "node:path"
import { Effect, Layer, Option, Schema } from "effect"
import { Command, Flag } from "effect/cli"
import { configToJson, parseConfig } from "../src/core/config.ts"
import { modelClassFor } from "../src/core/models/decoder.ts"
import { specFor } from "../src/core/partitionRules.ts"
import type { ShardedArray } from "../src/core/shardedArray.ts"
import { NamedSharding } from "../src/core/sharding.ts"
import { type ArrayTarget, Checkpointer } from "../src/layers/Checkpointer.ts"
import { CpuRuntime, createDeviceMesh } from "../src/layers/Devices.ts"
import { saveHuggingFace } from "../src/layers/exportModel.ts"
import { Hub } from "../src/layers/Hub.ts"
import { loadModelHub } from "../src/layers/loadModel.ts"
import { reportFailures } from "./report.ts"

export class ConvertUsage extends Schema.TaggedError<ConvertUsage>()("ConvertUsage", {
  detail: Schema.String,
}) {
  override get message() {
    return this.detail
  }
}

const opt = <A>(o: Option.Option<A>): A | undefined => Option.getOrUndefined(o)

const flags = {
  checkpointDir: Flag.String("checkpoint-dir").pipe(
    Flag.withDescription("the checkpoint directory (read, or written with --from-hf)"),
  ),
  step: Flag.Int("step").pipe(
    Flag.optional,
    Flag.withDescription("the step to export (default: the latest)"),
  ),
  outputDir: Flag.String("output-dir").pipe(
    Flag.optional,
    Flag.withDescription("where the Hugging Face model goes"),
  ),
  dtype: Flag.Literals("dtype", ["float32", "bfloat16"]).pipe(Flag.withDefault("float32")),
  maxShardSize: Flag.Finite("max-shard-size").pipe(
    Flag.withDefault(5e9),
    Flag.withDescription("bytes per safetensors file"),
  ),
  fromHf: Flag.String("from-hf").pipe(
    Flag.optional,
    Flag.withDescription("import this Hub id or directory into --checkpoint-dir"),
  ),
  modelType: Flag.Literals("model-type", ["llama", "mistral", "gemma"]).pipe(Flag.withDefault("llama")),
  tokenizerDir: Flag.String("tokenizer-dir").pipe(
    Flag.optional,
    Flag.withDescription("copy its tokenizer files next to the model"),
  ),
}

type ConvertFlags = {
  readonly [K in keyof typeof flags]: (typeof flags)[K] extends Flag.Flag<infer A> ? A : never
}

export const convertProgram = (f: ConvertFlags) =>
  Effect.gen(function* () {
    const ckpt = yield* Checkpointer
    const mesh = yield* createDeviceMesh([1, 1])
    const Model = modelClassFor(f.modelType)
    const fromHf = opt(f.fromHf)
    if (fromHf) {
      const { model, params } = yield* loadModelHub(Model, fromHf, Model.partitionRules, mesh)
      yield* ckpt.save(
        0,
        { params },
        { rules: Model.partitionRules, modelConfig: configToJson(model.config) },
      )
      yield* ckpt.wait
      process.stderr.write(`magix: ${fromHf} imported as step 0 of ${ckpt.directory}\n`)
      return
    }
    const outputDir = opt(f.outputDir)
    if (!outputDir)
      return yield* new ConvertUsage({ detail: "give --output-dir (export) or --from-hf (import)" })
    const latest = yield* ckpt.latestStep
    const step = opt(f.step) ?? Option.getOrUndefined(latest)
    if (step === undefined)
      return yield* new ConvertUsage({ detail: `${ckpt.directory} holds no complete checkpoint` })
    const manifest = yield* ckpt.readManifest(step)
    if (!manifest.items.includes("params"))
      return yield* new ConvertUsage({
        detail: `step ${step} holds no parameters (a LoRA run's adapter is already in <checkpoint-dir>/lora)`,
      })
    const config = yield* parseConfig(manifest.modelConfig, `${ckpt.directory}/${step}/manifest.json`)
    const model = new Model(config)
    const targets: Record<string, ArrayTarget> = {}
    for (const [name, shape] of model.parameterShapes) {
      const saved = manifest.arrays.find((a) => a.path === `params/${name}`)
      targets[name] = {
        shape,
        dtype: (saved?.dtype as ArrayTarget["dtype"]) ?? "float32",
        sharding: new NamedSharding(mesh, specFor(Model.partitionRules, name, shape)),
      }
    }
    const restored = yield* ckpt.restore(step, { params: targets })
    const out = yield* saveHuggingFace(
      model,
      restored.params as Record<string, ShardedArray>,
      resolve(outputDir),
      {
        dtype: f.dtype,
        maxShardBytes: f.maxShardSize,
        ...(opt(f.tokenizerDir) ? { tokenizerDir: resolve(opt(f.tokenizerDir)!) } : {}),
      },
    )
    process.stderr.write(`magix: step ${step} written to ${out} (${f.dtype})\n`)
  })

export const convertCommand = Command.make("convert", flags, (f) =>
  reportFailures(
    convertProgram(f).pipe(
      Effect.scoped,
      Effect.provide(
        Checkpointer.layer({ directory: resolve(f.checkpointDir) }).pipe(
          Layer.provideMerge(Layer.mergeAll(CpuRuntime({ devices: 1 }), Hub.layer)),
        ),
      ),
    ),
  ),
).pipe(
  Command.withDescription(
    "a checkpoint step to the Hugging Face layout, or a Hugging Face model into a checkpoint",
  ),
)
