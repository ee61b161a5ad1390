/**
 * Training as one composable Effect program: the devices and mesh, the model (from the Hub or
 * fresh from a config), the data stream, the optimizer and its sharded state, then the loop of
 * jitted steps, with metrics and (through the Checkpointer) saves and exact resume.
 */
import { constants } from "node:fs"
import { access, appendFile } from "node:fs/promises"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { Effect, Option, Schema } from "effect"
import { configToJson, type ModelType, parameterCount } from "../core/config.ts"
import { DataPosition } from "../core/data/position.ts"
import type { HostArray } from "../core/dtype.ts"
import type { DeviceError } from "../core/errors.ts"
import { defaultLoraRules, initLora, loraPartitionRules, loraRank } from "../core/lora.ts"
import type { Mesh } from "../core/mesh.ts"
import { disposeBatch, placeBatch } from "../core/models/batch.ts"
import type { CausalLM, Params, TokenBatch } from "../core/models/decoder.ts"
import { modelClassFor } from "../core/models/decoder.ts"
import { initParams } from "../core/models/init.ts"
import {
  adamw,
  chain,
  checkFinite,
  clipByGlobalNorm,
  decayMask,
  initializeOptState,
  type Optimizer,
  type OptState,
  type Schedule,
  scalarsOf,
  skipNonFinite,
  warmupCosine,
} from "../core/optim.ts"
import { specFor } from "../core/partitionRules.ts"
import { totalPeakFlops } from "../core/peakFlops.ts"
import { isShardedArray, type ShardedArray, shardToHost, shardToHostLater } from "../core/shardedArray.ts"
import { NamedSharding, P } from "../core/sharding.ts"
import {
  countLossSpike,
  type LossSpikePolicy,
  lossSpikeDetector,
  makeGuardedStep,
  poisonGradients,
  TooManyLossSpikes,
} from "../core/stepGuard.ts"
import { makeLoraTrainStep, makeTrainStep } from "../core/train.ts"
import { leaves, type Tree } from "../core/tree.ts"
import { type ArrayTarget, Checkpointer, CheckpointMismatch } from "./Checkpointer.ts"
import { openDataset } from "./Dataset.ts"
import { createDeviceMesh, Devices } from "./Devices.ts"
import type { BatchStream } from "./data/BatchStream.ts"
import { makeBatchStream } from "./data/BatchStream.ts"
import { Hub } from "./Hub.ts"
import { loadModelConfig, loadModelHub } from "./loadModel.ts"
import { makeDirectories } from "./makeDirectories.ts"
import { loadTokenizer } from "./Tokenizer.ts"

export interface Hyperparameters {
  readonly learningRate: number
  readonly weightDecay: number
  readonly adamBeta1: number
  readonly adamBeta2: number
  readonly maxGradNorm: number
  /** Steps the schedule spans (warmup is 10% of it, as the original train.py). */
  readonly totalSteps: number
  /** Consecutive non-finite steps tolerated before failing (optax.apply_if_finite's 10). */
  readonly maxConsecutiveNonFinite?: number
}

/** The original Magix optimizer: clip → AdamW with warmup-cosine and the decay mask → skip non-finite. */
export const magixOptimizer = (h: Hyperparameters): { optimizer: Optimizer; schedule: Schedule } => {
  const schedule = warmupCosine({
    peak: h.learningRate,
    warmup: Math.max(1, Math.floor(h.totalSteps * 0.1)),
    total: Math.max(2, h.totalSteps),
  })
  const optimizer = chain(
    clipByGlobalNorm(h.maxGradNorm),
    adamw({ lr: schedule, b1: h.adamBeta1, b2: h.adamBeta2, weightDecay: h.weightDecay, mask: decayMask }),
    skipNonFinite({ maxConsecutive: h.maxConsecutiveNonFinite ?? 10 }),
  )
  return { optimizer, schedule }
}

/** One logged step, as written to the metrics file (JSONL). */
export interface StepMetrics {
  readonly step: number
  readonly loss: number
  readonly learningRate: number
  readonly gradNorm: number
  readonly tokens: number
  readonly tokensPerSecond: number
  /** Model FLOPs utilisation against `peakFlops`, when known. */
  readonly mfu?: number
  /** Steps whose update was skipped for NaN or Inf gradients (over the whole run, resumes included). */
  readonly skippedSteps: number
  /** Steps skipped as loss spikes (`--skip-loss-spikes`), likewise. */
  readonly skippedLossSpikes?: number
  readonly elapsedSeconds: number
  readonly etaSeconds?: number
  readonly epoch: number
  /** Per device: bytes held now and the most held during the steps since the last log line (activations included). */
  readonly deviceMemory: { readonly inUse: ReadonlyArray<number>; readonly peak: ReadonlyArray<number> }
}

export class MetricsFileError extends Schema.TaggedError<MetricsFileError>()("MetricsFileError", {
  path: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `cannot write metrics to ${this.path} (${this.detail}): check --metrics-file`
  }
}

export class CheckpointDirectoryUnusable extends Schema.TaggedError<CheckpointDirectoryUnusable>()(
  "CheckpointDirectoryUnusable",
  { directory: Schema.String, detail: Schema.String },
) {
  override get message() {
    return `the checkpoint directory ${this.directory} cannot be created or written (${this.detail}): choose another --checkpoint-dir`
  }
}

/** A state a loop can hand to a checkpointer: everything exact resume needs. */
export interface TrainState {
  readonly step: number
  readonly params: Params
  readonly optState: OptState
  readonly dataPosition: DataPosition
}

/** One jitted update of the trained parameters (full parameters, or LoRA pairs). */
export type StepFn = (
  params: Params,
  optState: OptState,
  batch: TokenBatch,
) => Effect.Effect<{ readonly loss: ShardedArray }, DeviceError>

export interface LoopOptions {
  readonly model: CausalLM
  /** What the step updates: the parameters, or the LoRA pairs. */
  readonly params: Params
  /** The update; the full-parameter train step by default. */
  readonly step?: StepFn
  readonly optState: OptState
  readonly optimizer: Optimizer
  readonly schedule: Schedule
  readonly mesh: Mesh
  readonly data: BatchStream
  /** Steps already done (when resuming). */
  readonly startStep?: number
  readonly maxSteps: number
  readonly metricsFile?: string
  /** Read the loss back every this many steps (a host synchronisation). */
  readonly logEvery?: number
  /** Peak FLOP/s of the whole mesh, for MFU. */
  readonly peakFlops?: number
  readonly onStep?: (m: StepMetrics) => Effect.Effect<void>
  /** Called after every step with the state (a checkpointer decides whether to save). */
  readonly afterStep?: (s: TrainState) => Effect.Effect<void, unknown>
  /**
   * Whether afterStep reads the state after this step (a checkpoint is saved). Where it says no,
   * the step's metrics may be read while the next step runs (see deferMetrics); absent, afterStep
   * is assumed to read after every step.
   */
  readonly savesAt?: (step: number) => boolean
  /**
   * Read a logged step's loss and optimizer scalars once the next step is queued, waiting for
   * that step only: the GPU then never idles while the host reads, builds the next batch and
   * launches. Metrics arrive one step later; a run that fails on non-finite steps fails one step
   * later. Default: on CUDA. Never with a loss-spike guard, at the last step, or at a step
   * afterStep saves.
   */
  readonly deferMetrics?: boolean
  /** Skip a step whose loss spikes, judged before its update (a host synchronisation per step). */
  readonly lossSpikes?: LossSpikePolicy
  /**
   * Fault injection, for tests only: the steps (1-based) whose gradients are overwritten with NaN
   * before the update, to exercise the non-finite guard end to end.
   */
  readonly injectNonFiniteGradients?: (step: number) => boolean
  /** What the guarded step differentiates (LoRA passes its own); the model's loss by default. */
  readonly lossFn?: (params: Params, batch: TokenBatch) => ShardedArray
  /** Recompute each layer's activations in the backward pass (activation checkpointing). */
  readonly remat?: boolean
  /** Replay the step as a graph from its third call; by default on CUDA only (a CUDA graph). */
  readonly graph?: boolean
}

/** FLOPs per token of a training step: 6·N + 12·L·d·T (parameters, layers, width, sequence). */
export const flopsPerToken = (model: CausalLM, sequence: number): number => {
  const c = model.config
  return 6 * parameterCount(c) + 12 * c.numHiddenLayers * c.hiddenSize * sequence
}

const memoryOf = (devices: Devices["Service"], mesh: Mesh) => {
  const stats = mesh.devices.map((d) => devices.backend.stats(d))
  return { inUse: stats.map((s) => s.inUse), peak: stats.map((s) => s.peak) }
}

/** Runs steps until the data ends or maxSteps; returns the last metrics. */
export const trainLoop = (o: LoopOptions) => {
  // Jitted steps made here keep constant buffers on the devices: freed however the loop ends.
  const disposers: Array<() => void> = []
  return Effect.gen(function* () {
    const devices = yield* Devices
    const { engine } = devices
    const remat = o.remat ?? false
    const graph = o.graph ?? devices.backend.platform === "cuda"
    const own = o.step ? undefined : makeTrainStep(o.model, o.optimizer, { remat, graph })
    if (own) disposers.push(own.dispose)
    const plain: StepFn = o.step ?? own!
    const spikes = o.lossSpikes
      ? { policy: o.lossSpikes, detector: lossSpikeDetector(o.lossSpikes) }
      : undefined
    const guarded =
      spikes || o.injectNonFiniteGradients
        ? makeGuardedStep(o.lossFn ?? ((p, b) => o.model.loss(p, b, { remat })), o.optimizer)
        : undefined
    if (guarded) disposers.push(guarded.dispose)
    let consecutiveSpikes = 0
    // Whether to apply the update of step n, seen after its backward pass: an injected fault
    // poisons the gradients (the optimizer must skip), a spike is skipped and counted here.
    const decide = (n: number) => (loss: ShardedArray, grads: Params) =>
      Effect.gen(function* () {
        if (o.injectNonFiniteGradients?.(n)) {
          poisonGradients(grads)
          return true
        }
        if (!spikes) return true
        const value = Number(shardToHost(loss, 0)[0])
        if (!spikes.detector.isSpike(value)) {
          consecutiveSpikes = 0
          spikes.detector.accept(value)
          return true
        }
        consecutiveSpikes++
        if (consecutiveSpikes > spikes.policy.maxConsecutive)
          return yield* new TooManyLossSpikes({
            step: n,
            consecutive: consecutiveSpikes,
            loss: value,
            mean: spikes.detector.mean(),
          })
        countLossSpike(o.optState)
        return false
      })
    const step = (n: number, batch: TokenBatch) =>
      guarded ? guarded(o.params, o.optState, batch, decide(n)) : plain(o.params, o.optState, batch)
    const logEvery = Math.max(1, o.logEvery ?? 1)
    const flops = flopsPerToken(o.model, o.data.plan.maxLength)
    if (o.metricsFile) {
      const path = o.metricsFile
      yield* Effect.tryPromise({
        try: () => makeDirectories(dirname(path)),
        catch: (e) => new MetricsFileError({ path, detail: String(e) }),
      })
    }
    let stepIndex = o.startStep ?? 0
    let last: StepMetrics | undefined
    const start = performance.now()
    let windowStart = start
    let windowTokens = 0
    let totalTokens = 0
    // The metrics of a logged step whose reads were started but not yet finished: they finish
    // once the next step is queued, waiting for their own step only, so the GPU is never idle
    // while the host reads a loss, builds the next batch and launches the next step.
    interface Deferred {
      readonly step: number
      readonly loss: ShardedArray
      readonly readLoss: () => HostArray
      readonly readScalars: () => HostArray
      readonly tokens: number
      readonly epoch: number
    }
    let deferred: Deferred | undefined
    const report = (d: Deferred) =>
      Effect.gen(function* () {
        const loss = Number(d.readLoss()[0])
        const scalars = scalarsOf(d.readScalars() as Float64Array)
        yield* checkFinite(o.optimizer, scalars)
        const now = performance.now()
        const tps = (windowTokens / (now - windowStart)) * 1000
        const elapsed = (now - start) / 1000
        const perStep = elapsed / (d.step - (o.startStep ?? 0))
        last = {
          step: d.step,
          loss,
          learningRate: scalars.learningRate,
          gradNorm: scalars.gradNorm,
          tokens: d.tokens,
          tokensPerSecond: tps,
          ...(o.peakFlops ? { mfu: (tps * flops) / o.peakFlops } : {}),
          skippedSteps: scalars.totalNonFinite,
          ...(scalars.lossSpikes > 0 || spikes ? { skippedLossSpikes: scalars.lossSpikes } : {}),
          elapsedSeconds: elapsed,
          etaSeconds: perStep * (o.maxSteps - d.step),
          epoch: d.epoch,
          deviceMemory: memoryOf(devices, o.mesh),
        }
        for (const dev of o.mesh.devices) devices.backend.resetPeak(dev)
        windowStart = now
        windowTokens = 0
        if (o.metricsFile) {
          const path = o.metricsFile
          const line = `${JSON.stringify(last)}\n`
          yield* Effect.tryPromise({
            try: () => appendFile(path, line),
            catch: (e) => new MetricsFileError({ path, detail: String(e) }),
          })
        }
        if (o.onStep) yield* o.onStep(last)
      }).pipe(Effect.ensuring(Effect.sync(() => d.loss.dispose())))
    const flush = Effect.suspend(() => {
      const d = deferred
      deferred = undefined
      return d ? report(d) : Effect.void
    })
    // Deferring is safe where nothing reads the state between steps: no spike guard (it reads
    // each loss before the update) and no afterStep that will read it (a checkpoint save).
    const mayDefer = (n: number) =>
      (o.deferMetrics ?? devices.backend.platform === "cuda") &&
      !guarded &&
      n !== o.maxSteps &&
      (!o.afterStep || (o.savesAt !== undefined && !o.savesAt(n)))
    const loop = Effect.gen(function* () {
      while (stepIndex < o.maxSteps) {
        const next = yield* o.data.next
        if (Option.isNone(next)) break
        const host = next.value
        const placed = yield* placeBatch(engine, o.mesh, host)
        const out = yield* step(stepIndex + 1, placed.batch).pipe(
          Effect.ensuring(Effect.sync(() => disposeBatch(placed.batch))),
        )
        stepIndex++
        // Until report or `deferred` takes it, the loss is freed here, also when the metrics
        // fail or the run is interrupted meanwhile.
        let owned = true
        yield* Effect.gen(function* () {
          // The previous step's metrics, now that this step is queued behind them.
          yield* flush
          windowTokens += host.tokens
          totalTokens += host.tokens
          if (stepIndex % logEvery === 0 || stepIndex === o.maxSteps) {
            const loss = out.loss
            const d = { step: stepIndex, loss, tokens: totalTokens, epoch: host.epoch }
            owned = false
            if (mayDefer(stepIndex))
              deferred = {
                ...d,
                readLoss: shardToHostLater(loss, 0),
                readScalars: shardToHostLater(o.optState.scalars, 0),
              }
            else
              yield* report({
                ...d,
                readLoss: () => shardToHost(loss, 0),
                readScalars: () => shardToHost(o.optState.scalars, 0),
              })
          }
          if (o.afterStep)
            yield* o.afterStep({
              step: stepIndex,
              params: o.params,
              optState: o.optState,
              dataPosition: host.position,
            })
        }).pipe(
          Effect.ensuring(
            Effect.sync(() => {
              if (owned) out.loss.dispose()
            }),
          ),
        )
      }
      yield* flush
    })
    yield* loop.pipe(
      Effect.ensuring(
        Effect.sync(() => {
          // A run that ends early still finishes the started reads (their pinned slots are
          // reused) before it frees the loss.
          const d = deferred
          deferred = undefined
          if (!d) return
          try {
            d.readLoss()
            d.readScalars()
          } catch {
            // The run is already ending with its own error; a failed read adds nothing.
          }
          d.loss.dispose()
        }),
      ),
    )
    return { lastMetrics: last, steps: stepIndex }
  }).pipe(Effect.ensuring(Effect.sync(() => disposers.splice(0).forEach((d) => d()))))
}

// ---------- the whole program behind `magix train` ----------

/** The model shipped in the repository: `magix train` with no model flags trains it from scratch. */
export const embeddedModelDir = fileURLToPath(new URL("../../examples/tiny", import.meta.url))
export const embeddedTrainFile = join(embeddedModelDir, "addition.jsonl")

export interface TrainOptions extends Omit<Hyperparameters, "totalSteps"> {
  readonly modelType: ModelType
  /** Hub id or local directory; absent: the embedded tiny model, initialised fresh. */
  readonly modelName?: string
  readonly tokenizerName?: string
  readonly trainFile: string
  readonly trainDataConfig?: string
  readonly split: string
  readonly trainDataField: string
  readonly useChatTemplate: boolean
  readonly maxLength: number
  readonly numEpochs: number
  readonly batchSize: number
  readonly meshShape: ReadonlyArray<number>
  readonly seed: number
  readonly maxSteps?: number
  readonly packing: boolean
  readonly metricsFile?: string
  readonly logEvery?: number
  readonly dataWorkers?: number
  readonly bf16ModelWeights: boolean
  /** Activation checkpointing: recompute each layer in the backward pass (less memory, ~1/3 more compute). */
  readonly gradientCheckpointing?: boolean
  /** Replay steps as a CUDA graph (default true; no effect on the CPU). */
  readonly cudaGraph?: boolean
  /** See LoopOptions.deferMetrics (default: on CUDA). */
  readonly deferMetrics?: boolean
  /** Train LoRA pairs of this rank (and alpha) on every layer projection, the base frozen. */
  readonly lora?: { readonly rank: number; readonly alpha: number }
  readonly lossSpikes?: LossSpikePolicy
  /** Tests only: see LoopOptions.injectNonFiniteGradients. */
  readonly injectNonFiniteGradients?: (step: number) => boolean
  readonly onStep?: (m: StepMetrics) => Effect.Effect<void>
  readonly onStart?: (info: {
    readonly model: CausalLM
    readonly mesh: Mesh
    readonly totalSteps: number
    readonly startStep: number
    readonly parameters: number
  }) => Effect.Effect<void>
}

const peakFlopsOption = (names: ReadonlyArray<string>): { peakFlops?: number } => {
  const peak = totalPeakFlops(names)
  return peak === undefined ? {} : { peakFlops: peak }
}

/** Loads or initialises the model, builds data and optimizer, and runs the loop. */
export const runTraining = (o: TrainOptions) =>
  Effect.gen(function* () {
    const devices = yield* Devices
    const ckpt = yield* Checkpointer
    // Found out now, not at the first save after hours of training.
    yield* Effect.tryPromise({
      try: async () => {
        await makeDirectories(ckpt.directory)
        await access(ckpt.directory, constants.W_OK)
      },
      catch: (e) =>
        new CheckpointDirectoryUnusable({
          directory: ckpt.directory,
          detail: (e as NodeJS.ErrnoException).code ?? String(e),
        }),
    })
    const mesh = yield* createDeviceMesh(o.meshShape)
    const Model = modelClassFor(o.modelType)
    const rules = Model.partitionRules
    const fresh = o.modelName === undefined
    const dtype = o.bf16ModelWeights ? "bfloat16" : "float32"
    const latest = yield* ckpt.latestStep
    const disposeAll = (arrays: ReadonlyArray<ShardedArray>) =>
      Effect.sync(() => arrays.forEach((a) => a.dispose()))
    const configDir = fresh
      ? embeddedModelDir
      : yield* (yield* Hub).snapshot(o.modelName!, { allowPatterns: ["config.json"] })
    const model = yield* loadModelConfig(Model, configDir)
    // The model's own device arrays (RoPE tables, made on first use) go when the run ends.
    yield* Effect.addFinalizer(() => Effect.sync(() => model.dispose()))
    // The base parameters: from the checkpoint when resuming full training; otherwise fresh (the
    // embedded model, seeded) or from the Hub. LoRA training never checkpoints them.
    const baseFromCheckpoint = Option.isSome(latest) && !o.lora
    const params: Params = baseFromCheckpoint
      ? ({} as Params)
      : fresh
        ? yield* Effect.acquireRelease(
            initParams(model, devices.engine, mesh, rules, { seed: o.seed }),
            (p) => disposeAll(Object.values(p)),
          )
        : (yield* loadModelHub(Model, o.modelName!, rules, mesh, { dtype })).params
    if (devices.platform === "cuda") model.computeDtype = "bfloat16"
    const loraRules = o.lora ? defaultLoraRules(o.lora.rank) : undefined
    const loraNames = loraRules
      ? model.parameterShapes.flatMap(([n, shape]) =>
          shape.length === 2 && loraRank(loraRules, n) !== undefined ? [`${n}.lora_A`, `${n}.lora_B`] : [],
        )
      : []
    const trainedRules = o.lora ? loraPartitionRules(rules, loraNames) : rules
    let trained: Params
    let optStateRestored: OptState | undefined
    let resume: DataPosition | undefined
    let startStep = 0
    if (Option.isSome(latest)) {
      startStep = latest.value
      const manifest = yield* ckpt.readManifest(startStep)
      const targets: Record<string, ArrayTarget> = {}
      if (o.lora) {
        const lora = yield* initLora(
          devices.engine,
          mesh,
          model.parameterShapes,
          rules,
          { rules: loraRules!, alpha: o.lora.alpha },
          o.seed,
        )
        for (const [n, a] of Object.entries(lora))
          targets[n] = { shape: a.shape, dtype: a.dtype, sharding: a.sharding }
        Object.values(lora).forEach((a) => a.dispose())
      } else {
        for (const [name, shape] of model.parameterShapes)
          targets[name] = { shape, dtype, sharding: new NamedSharding(mesh, specFor(rules, name, shape)) }
      }
      const moments = Object.fromEntries(
        Object.entries(targets).map(([k, t]) => [k, { ...t, dtype: "float32" as const }]),
      )
      const item = o.lora ? "lora" : "params"
      const restored = yield* Effect.acquireRelease(
        ckpt.restore(startStep, {
          [item]: targets,
          optState: {
            mu: moments,
            nu: moments,
            scalars: { shape: [8], dtype: "float64", sharding: new NamedSharding(mesh, P()) },
          },
        } as Record<string, Tree<ArrayTarget>>),
        (r) => disposeAll(Object.values(r).flatMap((t) => leaves(t as never, isShardedArray))),
      )
      trained = (restored as Record<string, unknown>)[item] as Params
      if (!o.lora) Object.assign(params as Record<string, ShardedArray>, trained)
      optStateRestored = (restored as Record<string, unknown>).optState as OptState
      resume = yield* Schema.decodeUnknownEffect(DataPosition)(manifest.dataPosition).pipe(
        Effect.mapError(
          (e) =>
            new CheckpointMismatch({ step: startStep, array: "dataPosition", detail: String(e.message) }),
        ),
      )
    } else if (o.lora) {
      trained = yield* Effect.acquireRelease(
        initLora(
          devices.engine,
          mesh,
          model.parameterShapes,
          rules,
          { rules: loraRules!, alpha: o.lora.alpha },
          o.seed,
        ),
        (p) => disposeAll(Object.values(p)),
      )
    } else {
      trained = params
    }
    const tokenizer = yield* loadTokenizer(o.tokenizerName ?? o.modelName ?? embeddedModelDir, {
      addEosToken: true,
    })
    const dataset = yield* openDataset({
      path: o.trainFile,
      field: o.trainDataField,
      split: o.split,
      ...(o.trainDataConfig ? { config: o.trainDataConfig } : {}),
    })
    const data = yield* makeBatchStream({
      dataset,
      tokenizer,
      batchSize: o.batchSize,
      maxLength: o.maxLength,
      mode: o.packing ? "packing" : "padding",
      seed: o.seed,
      useChatTemplate: o.useChatTemplate,
      ...(o.packing ? {} : { epochs: o.numEpochs }),
      ...(o.dataWorkers !== undefined ? { workers: o.dataWorkers } : {}),
      ...(resume ? { resume } : {}),
    })
    const epochSteps = data.stepsPerEpoch ?? Math.ceil(dataset.count / o.batchSize)
    // The schedule spans the planned run; --max-steps only stops early, so a stopped and resumed
    // run follows the same learning rates as one straight run.
    const planned = o.packing && o.maxSteps !== undefined ? o.maxSteps : epochSteps * o.numEpochs
    const stopAt = Math.min(o.maxSteps ?? Number.POSITIVE_INFINITY, planned)
    const { optimizer, schedule } = magixOptimizer({ ...o, totalSteps: planned })
    const optState =
      optStateRestored ??
      (yield* Effect.acquireRelease(initializeOptState(optimizer, trained, trainedRules, mesh), (s) =>
        disposeAll([...Object.values(s.mu), ...Object.values(s.nu), s.scalars]),
      ))
    if (o.onStart)
      yield* o.onStart({
        model,
        mesh,
        totalSteps: stopAt,
        startStep,
        parameters: parameterCount(model.config),
      })
    const remat = o.gradientCheckpointing ?? false
    const graph = (o.cudaGraph ?? true) && devices.backend.platform === "cuda"
    const loraStep = o.lora
      ? makeLoraTrainStep(model, optimizer, params, o.lora.alpha, { remat, graph })
      : undefined
    if (loraStep) yield* Effect.addFinalizer(() => Effect.sync(() => loraStep.dispose()))
    const result = yield* trainLoop({
      model,
      params: trained,
      ...(o.lora
        ? {
            step: loraStep!,
            lossFn: (p: Params, b: TokenBatch) =>
              model.loss(params, b, { lora: { params: p, alpha: o.lora!.alpha }, remat }),
          }
        : {}),
      remat,
      graph,
      ...(o.lossSpikes ? { lossSpikes: o.lossSpikes } : {}),
      ...(o.injectNonFiniteGradients ? { injectNonFiniteGradients: o.injectNonFiniteGradients } : {}),
      optState,
      optimizer,
      schedule,
      mesh,
      data,
      startStep,
      maxSteps: stopAt,
      // MFU only where every device's peak is known: a CPU or an unlisted GPU shows none.
      ...peakFlopsOption(mesh.devices.map((d) => devices.info[d]?.name ?? "")),
      ...(o.metricsFile ? { metricsFile: o.metricsFile } : {}),
      ...(o.logEvery ? { logEvery: o.logEvery } : {}),
      ...(o.onStep ? { onStep: o.onStep } : {}),
      ...(o.deferMetrics !== undefined ? { deferMetrics: o.deferMetrics } : {}),
      savesAt: (step) => ckpt.shouldSave(step, step === stopAt),
      afterStep: (s) =>
        ckpt.shouldSave(s.step, s.step === stopAt)
          ? ckpt.save(
              s.step,
              {
                [o.lora ? "lora" : "params"]: s.params,
                optState: { mu: s.optState.mu, nu: s.optState.nu, scalars: s.optState.scalars },
              },
              {
                rules: trainedRules,
                dataPosition: s.dataPosition,
                modelConfig: configToJson(model.config),
                rng: { seed: o.seed },
                ...(o.lora ? { extras: { lora: { rank: o.lora.rank, alpha: o.lora.alpha } } } : {}),
              },
            )
          : Effect.void,
    })
    yield* ckpt.wait
    return {
      ...result,
      startStep,
      model,
      params,
      lora: o.lora ? trained : undefined,
      optState,
      tokenizer,
      mesh,
    }
  })
