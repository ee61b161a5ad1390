/**
 * `magix train`: the flags of the original train.py. With no model flags it trains the tiny
 * Llama shipped in examples/tiny on its arithmetic data, on the CPU, in a couple of minutes.
 */
import { dirname, join, resolve } from "node:path"
import { Effect, Layer, Option, Schema } from "effect"
import { Command, Flag } from "effect/cli"
import { defaultLossSpikePolicy } from "../src/core/stepGuard.ts"
import { Checkpointer } from "../src/layers/Checkpointer.ts"
import { CpuRuntime, DefaultRuntime, Devices } from "../src/layers/Devices.ts"
import { saveHuggingFace } from "../src/layers/exportModel.ts"
import { Hub } from "../src/layers/Hub.ts"
import { saveLoraAdapter } from "../src/layers/loraAdapter.ts"
import { makeProgress } from "../src/layers/Progress.ts"
import { describeFlags, makeLiveReport } from "../src/layers/report/liveReport.ts"
import { embeddedModelDir, embeddedTrainFile, runTraining } from "../src/layers/Training.ts"
import { parseIntList } from "./argv.ts"
import { reportFailures } from "./report.ts"
import { setInterruptHint } from "./signals.ts"

export class MissingFlag extends Schema.TaggedError<MissingFlag>()("MissingFlag", {
  flag: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return `${this.flag} is required ${this.reason}`
  }
}

const opt = <A>(o: Option.Option<A>): A | undefined => Option.getOrUndefined(o)

export const trainFlags = {
  modelType: Flag.Literals("model-type", ["llama", "mistral", "gemma"]).pipe(
    Flag.withDefault("llama"),
    Flag.withDescription("model family"),
  ),
  modelName: Flag.String("model-name").pipe(
    Flag.optional,
    Flag.withDescription(
      "Hub id or local directory (default: the tiny Llama in examples/tiny, trained from scratch)",
    ),
  ),
  tokenizerName: Flag.String("tokenizer-name").pipe(
    Flag.optional,
    Flag.withDescription("default: the model's"),
  ),
  trainFile: Flag.String("train-file").pipe(
    Flag.optional,
    Flag.withDescription(
      ".jsonl, .parquet, a directory or a Hub dataset id (default: examples/tiny/addition.jsonl)",
    ),
  ),
  trainDataConfig: Flag.String("train-data-config").pipe(
    Flag.optional,
    Flag.withDescription("Hub dataset config"),
  ),
  split: Flag.String("split").pipe(Flag.withDefault("train")),
  trainDataField: Flag.String("train-data-field").pipe(Flag.withDefault("text")),
  useChatTemplate: Flag.Boolean("use-chat-template").pipe(
    Flag.withDefault(false),
    Flag.withDescription("render message lists with the chat template"),
  ),
  checkpointDir: Flag.String("checkpoint-dir").pipe(
    Flag.optional,
    Flag.withDescription("default ./checkpoints/tiny"),
  ),
  maxLength: Flag.Int("max-length").pipe(
    Flag.optional,
    Flag.withDescription("tokens per row (default 1024; 16 for the tiny model)"),
  ),
  numEpochs: Flag.Int("num-epochs").pipe(Flag.optional),
  batchSize: Flag.Int("batch-size").pipe(
    Flag.optional,
    Flag.withDescription("global batch (default 16; 32 for the tiny model)"),
  ),
  learningRate: Flag.Finite("learning-rate").pipe(Flag.optional),
  weightDecay: Flag.Finite("weight-decay").pipe(Flag.withDefault(1e-4)),
  adamBeta1: Flag.Finite("adam-beta1").pipe(Flag.withDefault(0.9)),
  adamBeta2: Flag.Finite("adam-beta2").pipe(Flag.withDefault(0.999)),
  maxGradNorm: Flag.Finite("max-grad-norm").pipe(Flag.withDefault(1.0)),
  saveSteps: Flag.Int("save-steps").pipe(Flag.withDefault(200)),
  seed: Flag.Int("seed").pipe(Flag.withDefault(42)),
  meshShape: Flag.String("mesh-shape").pipe(
    Flag.withDefault("-1,1"),
    Flag.withDescription("e.g. --mesh-shape 2 2 (data, model); -1 takes the rest"),
  ),
  bf16ModelWeights: Flag.Boolean("bf16-model-weights").pipe(Flag.withDefault(false)),
  gradientCheckpointing: Flag.Boolean("gradient-checkpointing").pipe(
    Flag.withDefault(false),
    Flag.withDescription(
      "recompute each layer's activations in the backward pass: much less memory for about a third more compute",
    ),
  ),
  noCudaGraph: Flag.Boolean("no-cuda-graph").pipe(
    Flag.withDefault(false),
    Flag.withDescription(
      "on a GPU, replay every step op by op instead of launching it as one CUDA graph (for profilers and debugging)",
    ),
  ),
  maxSteps: Flag.Int("max-steps").pipe(Flag.optional, Flag.withDescription("stop after this many steps")),
  cpuDevices: Flag.Int("cpu-devices").pipe(
    Flag.optional,
    Flag.withDescription("run on N virtual CPU devices"),
  ),
  metricsFile: Flag.String("metrics-file").pipe(
    Flag.optional,
    Flag.withDescription("JSONL, one object per logged step"),
  ),
  report: Flag.String("report").pipe(
    Flag.optional,
    Flag.withDescription(
      "write an HTML page with the loss and learning-rate curves, configuration and summary (refreshed at each checkpoint)",
    ),
  ),
  packing: Flag.Boolean("packing").pipe(
    Flag.withDefault(false),
    Flag.withDescription("pack documents into rows instead of padding each"),
  ),
  logEvery: Flag.Int("log-every").pipe(Flag.withDefault(1)),
  lora: Flag.Boolean("lora").pipe(
    Flag.withDefault(false),
    Flag.withDescription("train LoRA pairs on every layer projection (the base frozen), as train_lora.py"),
  ),
  loraRank: Flag.Int("lora-rank").pipe(Flag.withDefault(8)),
  loraAlpha: Flag.Finite("lora-alpha").pipe(Flag.withDefault(32)),
  skipLossSpikes: Flag.Boolean("skip-loss-spikes").pipe(
    Flag.withDefault(false),
    Flag.withDescription(
      "skip the update of a step whose loss exceeds --loss-spike-factor times the mean of the last 32 (counted as skippedLossSpikes in the metrics)",
    ),
  ),
  lossSpikeFactor: Flag.Finite("loss-spike-factor").pipe(
    Flag.withDefault(defaultLossSpikePolicy.factor),
    Flag.withDescription("what counts as a loss spike, with --skip-loss-spikes (default 3)"),
  ),
  maxNonFiniteSteps: Flag.Int("max-non-finite-steps").pipe(
    Flag.withDefault(10),
    Flag.withDescription(
      "steps with NaN or Inf gradients are skipped; after more than this many in a row (or as many loss spikes) the run stops, its last checkpoint kept (default 10)",
    ),
  ),
}

type TrainFlags = {
  readonly [K in keyof typeof trainFlags]: (typeof trainFlags)[K] extends Flag.Flag<infer A> ? A : never
}

/** --checkpoint-dir, or checkpoints/tiny for the embedded model (where `magix generate` looks). */
const checkpointDirOf = (f: TrainFlags) =>
  resolve(opt(f.checkpointDir) ?? (Option.isNone(f.modelName) ? "checkpoints/tiny" : "checkpoints"))

export const trainProgram = (f: TrainFlags) =>
  Effect.gen(function* () {
    const modelName = opt(f.modelName)
    const embedded = modelName === undefined
    const trainFile = opt(f.trainFile) ?? (embedded ? embeddedTrainFile : undefined)
    if (!trainFile)
      return yield* new MissingFlag({
        flag: "--train-file",
        reason: "with --model-name (a .jsonl, .parquet or Hub dataset)",
      })
    const checkpointDir = checkpointDirOf(f)
    setInterruptHint(`run the same command to resume from the last checkpoint in ${checkpointDir}`)
    const progress = makeProgress()
    const devices = yield* Devices
    const reportPath = opt(f.report)
    const report = reportPath
      ? yield* makeLiveReport({
          path: reportPath,
          title: `magix train: ${modelName ?? "the embedded tiny Llama"}`,
          flags: describeFlags(f),
          everySteps: f.saveSteps,
          ...(opt(f.metricsFile) ? { metricsFile: opt(f.metricsFile)! } : {}),
          warn: progress.message,
        })
      : undefined
    let total = 0
    const result = yield* runTraining({
      modelType: f.modelType,
      ...(modelName ? { modelName } : {}),
      ...(opt(f.tokenizerName) ? { tokenizerName: opt(f.tokenizerName)! } : {}),
      trainFile,
      ...(opt(f.trainDataConfig) ? { trainDataConfig: opt(f.trainDataConfig)! } : {}),
      split: f.split,
      trainDataField: f.trainDataField,
      useChatTemplate: f.useChatTemplate,
      maxLength: opt(f.maxLength) ?? (embedded ? 16 : 1024),
      numEpochs: opt(f.numEpochs) ?? (embedded ? 120 : 1),
      batchSize: opt(f.batchSize) ?? (embedded ? 32 : 16),
      learningRate: opt(f.learningRate) ?? (embedded ? 5e-3 : 2e-6),
      weightDecay: f.weightDecay,
      adamBeta1: f.adamBeta1,
      adamBeta2: f.adamBeta2,
      maxGradNorm: f.maxGradNorm,
      meshShape: parseIntList(f.meshShape),
      seed: f.seed,
      ...(opt(f.maxSteps) !== undefined ? { maxSteps: opt(f.maxSteps)! } : {}),
      packing: f.packing,
      ...(opt(f.metricsFile) ? { metricsFile: opt(f.metricsFile)! } : {}),
      logEvery: f.logEvery,
      bf16ModelWeights: f.bf16ModelWeights,
      gradientCheckpointing: f.gradientCheckpointing,
      cudaGraph: !f.noCudaGraph,
      ...(f.lora ? { lora: { rank: f.loraRank, alpha: f.loraAlpha } } : {}),
      // Flags objects built in code (tests) may predate these flags: their defaults apply.
      maxConsecutiveNonFinite: f.maxNonFiniteSteps ?? 10,
      ...(f.skipLossSpikes
        ? {
            lossSpikes: {
              ...defaultLossSpikePolicy,
              factor: f.lossSpikeFactor ?? defaultLossSpikePolicy.factor,
              maxConsecutive: f.maxNonFiniteSteps ?? 10,
            },
          }
        : {}),
      onStart: (info) =>
        Effect.sync(() => {
          total = info.totalSteps
          const from =
            info.startStep > 0 ? `, resuming after step ${info.startStep} from ${checkpointDir}` : ""
          process.stderr.write(
            `magix: training ${info.model.modelType} (${(info.parameters / 1e6).toFixed(2)}M parameters) on ${info.mesh}, ${info.totalSteps} steps${from}\n`,
          )
        }).pipe(
          Effect.andThen(
            report?.started({ ...info, platform: devices.platform, devices: devices.info }) ?? Effect.void,
          ),
        ),
      onStep: (m) => Effect.andThen(progress.update(m, total), report?.step(m) ?? Effect.void),
    }).pipe(Effect.onExit((exit) => Effect.andThen(progress.end, report?.finish(exit) ?? Effect.void)))
    const out = join(checkpointDir, result.lora ? "lora" : "hf")
    if (result.lora) yield* saveLoraAdapter(result.lora, f.loraAlpha, out, modelName ?? embeddedModelDir)
    else
      yield* saveHuggingFace(result.model, result.params, out, {
        tokenizerDir: dirname(result.tokenizer.source.tokenizerFile),
      })
    process.stderr.write(
      `magix: ${result.steps} steps, ${result.lastMetrics ? `final loss ${result.lastMetrics.loss.toFixed(4)}` : "none left to run (the checkpoint is already at the last step)"}; ${result.lora ? "LoRA adapter" : "model"} saved to ${out}\n` +
        (reportPath ? `magix: report written to ${resolve(reportPath)}\n` : "") +
        (embedded ? "magix: now try `npx magix generate` to see what it learned\n" : ""),
    )
  })

const runtimeFor = (cpuDevices: Option.Option<number>) =>
  Option.isSome(cpuDevices) ? CpuRuntime({ devices: cpuDevices.value }) : DefaultRuntime()

export const trainCommand = Command.make("train", trainFlags, (f) =>
  reportFailures(
    trainProgram(f).pipe(
      Effect.scoped,
      Effect.provide(
        Checkpointer.layer({ directory: checkpointDirOf(f), saveInterval: f.saveSteps }).pipe(
          Layer.provideMerge(Layer.mergeAll(runtimeFor(f.cpuDevices), Hub.layer)),
        ),
      ),
    ),
  ),
).pipe(
  Command.withDescription(
    "train or fine-tune a model (no flags: the tiny Llama on single-digit sums, on the CPU)",
  ),
)

export { embeddedModelDir }
