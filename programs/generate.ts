/**
 * `magix generate`: the flags of the original generate.py. Prompts are batched with left padding,
 * continued greedily (or sampled), and written as JSONL {prompt, generated, continuation} in input
 * order. With no flags it asks the tiny model `magix train` made a few arithmetic questions.
 */
import { constants } from "node:fs"
import { access, writeFile } from "node:fs/promises"
import { dirname, join, resolve } from "node:path"
import { Effect, Layer, Option, Schema } from "effect"
import { Command, Flag } from "effect/cli"
import { promptBatches } from "../src/core/data/prompts.ts"
import { generate } from "../src/core/generate.ts"
import { mergeLora } from "../src/core/lora.ts"
import { modelClassFor } from "../src/core/models/decoder.ts"
import { loadPrompts } from "../src/layers/Dataset.ts"
import { CpuRuntime, createDeviceMesh, DefaultRuntime, Devices } from "../src/layers/Devices.ts"
import { Hub } from "../src/layers/Hub.ts"
import { loadModelHub } from "../src/layers/loadModel.ts"
import { loadLoraAdapter } from "../src/layers/loraAdapter.ts"
import { makeDirectories } from "../src/layers/makeDirectories.ts"
import { loadTokenizer } from "../src/layers/Tokenizer.ts"
import { embeddedModelDir } from "../src/layers/Training.ts"
import { parseIntList } from "./argv.ts"
import { reportFailures } from "./report.ts"

const opt = <A>(o: Option.Option<A>): A | undefined => Option.getOrUndefined(o)

export const generateFlags = {
  prompts: Flag.String("prompts").pipe(
    Flag.optional,
    Flag.withDescription(
      ".txt (a prompt per line), .jsonl with --data-field, or a Hub dataset (default: examples/tiny/prompts.txt)",
    ),
  ),
  dataField: Flag.String("data-field").pipe(Flag.withDefault("text")),
  hfDataConfig: Flag.String("hf-data-config").pipe(Flag.optional),
  hfDataSplit: Flag.String("hf-data-split").pipe(Flag.withDefault("test")),
  useChatTemplate: Flag.Boolean("use-chat-template").pipe(Flag.withDefault(false)),
  batchSize: Flag.Int("batch-size").pipe(Flag.withDefault(32)),
  padToMultipleOf: Flag.Int("pad-to-multiple-of").pipe(Flag.withDefault(64)),
  sample: Flag.Boolean("sample").pipe(
    Flag.withDefault(false),
    Flag.withDescription("sample instead of greedy decoding"),
  ),
  temperature: Flag.Finite("temperature").pipe(Flag.withDefault(0.7)),
  topK: Flag.Int("top-k").pipe(Flag.optional),
  topP: Flag.Finite("top-p").pipe(Flag.optional),
  seed: Flag.Int("seed").pipe(Flag.withDefault(42)),
  maxLength: Flag.Int("max-length").pipe(
    Flag.withDefault(512),
    Flag.withDescription("prompt plus continuation, in tokens"),
  ),
  modelType: Flag.Literals("model-type", ["llama", "mistral", "gemma"]).pipe(Flag.withDefault("llama")),
  modelNameOrPath: Flag.String("model-name-or-path").pipe(
    Flag.optional,
    Flag.withDescription("Hub id or directory (default: checkpoints/tiny/hf, what `magix train` writes)"),
  ),
  tokenizerNameOrPath: Flag.String("tokenizer-name-or-path").pipe(Flag.optional),
  meshShape: Flag.String("mesh-shape").pipe(Flag.withDefault("1,-1")),
  outputFile: Flag.String("output-file").pipe(Flag.withDefault("generated.jsonl")),
  cpuDevices: Flag.Int("cpu-devices").pipe(Flag.optional),
  lora: Flag.String("lora").pipe(
    Flag.optional,
    Flag.withDescription("a LoRA adapter directory (PEFT layout), merged into the model"),
  ),
}

export class OutputFileUnwritable extends Schema.TaggedError<OutputFileUnwritable>()("OutputFileUnwritable", {
  path: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `cannot write the generations to ${this.path} (${this.detail}): choose another --output-file`
  }
}

type GenerateFlags = {
  readonly [K in keyof typeof generateFlags]: (typeof generateFlags)[K] extends Flag.Flag<infer A> ? A : never
}

export const generateProgram = (f: GenerateFlags) =>
  Effect.gen(function* () {
    const devices = yield* Devices
    const path = resolve(f.outputFile)
    const unwritable = (e: unknown) =>
      new OutputFileUnwritable({ path, detail: (e as NodeJS.ErrnoException).code ?? String(e) })
    // Found out before generating, not after.
    yield* Effect.tryPromise({
      try: async () => {
        await makeDirectories(dirname(path))
        await access(dirname(path), constants.W_OK)
      },
      catch: unwritable,
    })
    const modelPath = opt(f.modelNameOrPath) ?? resolve("checkpoints/tiny/hf")
    const embedded = opt(f.prompts) === undefined
    const mesh = yield* createDeviceMesh(parseIntList(f.meshShape))
    const Model = modelClassFor(f.modelType)
    const loaded = yield* loadModelHub(Model, modelPath, Model.partitionRules, mesh)
    const { model } = loaded
    const adapterDir = opt(f.lora)
    const params = adapterDir
      ? yield* Effect.map(loadLoraAdapter(resolve(adapterDir), mesh, Model.partitionRules), (a) =>
          mergeLora(loaded.params, a.params, a.alpha, Model.partitionRules),
        )
      : loaded.params
    if (devices.platform === "cuda") model.computeDtype = "bfloat16"
    const tokenizer = yield* loadTokenizer(opt(f.tokenizerNameOrPath) ?? modelPath)
    const prompts = yield* loadPrompts(
      {
        path: opt(f.prompts) ?? join(embeddedModelDir, "prompts.txt"),
        field: f.dataField,
        split: f.hfDataSplit,
        ...(opt(f.hfDataConfig) ? { config: opt(f.hfDataConfig)! } : {}),
      },
      tokenizer,
      { useChatTemplate: f.useChatTemplate },
    )
    const out = new Array<{ prompt: string; generated: string; continuation: string }>(prompts.length)
    const batches = promptBatches(prompts, {
      batchSize: f.batchSize,
      maxLength: f.maxLength,
      padToMultipleOf: f.padToMultipleOf,
      padTokenId: tokenizer.padTokenId,
      ...(tokenizer.bosTokenId !== undefined ? { fillTokenId: tokenizer.bosTokenId } : {}),
    })
    for (const batch of batches) {
      const seqs = yield* generate(model, params, devices.engine, mesh, batch, {
        maxLength: Math.max(f.maxLength, batch.length + 1),
        sample: f.sample,
        temperature: f.temperature,
        ...(opt(f.topK) !== undefined ? { topK: opt(f.topK)! } : {}),
        ...(opt(f.topP) !== undefined ? { topP: opt(f.topP)! } : {}),
        seed: f.seed,
        eosTokenIds: tokenizer.eosTokenIds,
        padTokenId: tokenizer.padTokenId,
      })
      seqs.forEach((seq, row) => {
        const i = batch.indices[row]!
        if (i < 0) return
        const promptIds = prompts[i]!
        const continuation = seq.slice(batch.length)
        out[i] = {
          prompt: tokenizer.decode(promptIds, { skipSpecialTokens: true }),
          generated: tokenizer.decode(seq, { skipSpecialTokens: true }),
          continuation: tokenizer.decode(continuation, { skipSpecialTokens: true }),
        }
      })
    }
    yield* Effect.tryPromise({
      try: () => writeFile(path, out.map((o) => JSON.stringify(o)).join("\n") + "\n"),
      catch: unwritable,
    })
    if (embedded) for (const o of out) process.stdout.write(`${o.prompt}${o.continuation}\n`)
    process.stderr.write(`magix: ${out.length} generations written to ${path}\n`)
  })

export const generateCommand = Command.make("generate", generateFlags, (f) =>
  reportFailures(
    generateProgram(f).pipe(
      Effect.scoped,
      Effect.provide(
        Layer.mergeAll(
          Option.isSome(f.cpuDevices) ? CpuRuntime({ devices: f.cpuDevices.value }) : DefaultRuntime(),
          Hub.layer,
        ),
      ),
    ),
  ),
).pipe(
  Command.withDescription(
    "continue prompts with a trained model (no flags: the tiny model from `magix train`)",
  ),
)
