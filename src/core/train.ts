/**
 * The train step as one traced program: loss and gradients by reverse mode, then the fused
 * optimizer update written into the parameters and moments in place (they are donated).
 */
import { Effect } from "effect"
import { valueAndGrad } from "./autodiff.ts"
import { type DType, dtypeCode } from "./dtype.ts"
import type { Engine } from "./engine.ts"
import { attempt } from "./errors.ts"
import { type Jitted, jit } from "./jit.ts"
import type { CausalLM, Params, TokenBatch } from "./models/decoder.ts"
import { execEach } from "./ops/local.ts"
import { applyUpdates, type Optimizer, type OptState } from "./optim.ts"
import { numel } from "./shape.ts"
import { allocateArray, type ShardedArray } from "./shardedArray.ts"

export interface StepResult {
  readonly params: Params
  readonly optState: OptState
  /** The mean loss of the batch, a replicated scalar on the devices. */
  readonly loss: ShardedArray
}

export interface StepOptions {
  /** Recompute each layer's activations in the backward pass (activation checkpointing). */
  readonly remat?: boolean
  /** Replay the step as a graph from its third call (jit's `graph`; a CUDA graph on the GPU). */
  readonly graph?: boolean
  /**
   * Keep each parameter's copy in the model's compute dtype between steps (makeTrainStep; on by
   * default; used only where the compute dtype is not the parameters'): the optimizer writes them
   * with the update and the forward pass reads them, instead of casting every master weight every
   * step. The same values as casting, bit for bit.
   */
  readonly shadows?: boolean
}

/** f with castTo reading shadows[name] for params[name] (Engine.withCastShadows), where given. */
const readingShadows = <A>(params: Params, shadows: Params | undefined, f: () => A): A => {
  const engine = Object.values(params)[0]?.engine
  return shadows && engine
    ? engine.withCastShadows(
        new Map(Object.keys(shadows).map((name) => [params[name]!, shadows[name]!] as const)),
        f,
      )
    : f()
}

/** One step's loss, gradients and update; with shadows, castTo reads them and adamw writes them. */
const stepBody = (
  model: CausalLM,
  optimizer: Optimizer,
  options: StepOptions,
  params: Params,
  optState: OptState,
  batch: TokenBatch,
  shadows: Params | undefined,
): StepResult => {
  const remat = options.remat ?? false
  const { value, grads } = readingShadows(params, shadows, () =>
    valueAndGrad((p: Params) => model.loss(p, batch, { remat }))(params),
  )
  applyUpdates(optimizer, params, grads, optState, shadows)
  for (const g of Object.values(grads)) g.dispose()
  return { params, optState, loss: value }
}

/** The loss and update of one batch, unjitted (for tests and for steps that change shape). */
export const trainStepFn =
  (model: CausalLM, optimizer: Optimizer, options: StepOptions = {}) =>
  (params: Params, optState: OptState, batch: TokenBatch): StepResult =>
    stepBody(model, optimizer, options, params, optState, batch, undefined)

/**
 * The compute-dtype copies of a step's parameters, kept across its calls. A copy is made (a cast)
 * the first time a parameter array is seen, and again whenever the step is handed another array
 * under that name (a restore); between calls only the step's own update may change the
 * parameters, which writes the copies too. Anything else that writes into the parameter arrays
 * must call `resync` before the next step.
 */
class CastShadows {
  private readonly kept = new Map<string, { readonly of: ShardedArray; readonly shadow: ShardedArray }>()
  private stale = false

  /** The shadows of `params` in `dtype`, cast where needed; undefined where none apply. */
  sync(params: Params, dtype: DType): Params | undefined {
    const names = Object.keys(params)
    const arrays = names.map((n) => params[n]!)
    const first = arrays[0]
    // Shadows only where every parameter would be cast, from one dtype (adamw's single dtype).
    if (
      !first ||
      first.dtype === dtype ||
      arrays.some((a) => a.dtype !== first.dtype || a.partial.length > 0 || a.mesh !== first.mesh)
    ) {
      this.dispose()
      return undefined
    }
    const engine = first.engine
    const out: Record<string, ShardedArray> = {}
    for (const name of names) {
      const p = params[name]!
      let entry = this.kept.get(name)
      if (
        entry &&
        entry.of === p &&
        entry.shadow.dtype === dtype &&
        !entry.shadow.isDisposed &&
        !this.stale
      ) {
        out[name] = entry.shadow
        continue
      }
      let shadow = entry?.shadow
      if (!shadow || shadow.isDisposed || shadow.dtype !== dtype || shadow.sharding !== p.sharding) {
        if (shadow && !shadow.isDisposed) shadow.dispose()
        // Outside any tidy block or jit recording: the step keeps it across calls.
        shadow = engine.untracked(() => allocateArray(engine, p.shape, dtype, p.sharding))
      }
      try {
        castInto(engine, p, shadow)
      } catch (e) {
        // A copy that may be half cast is never kept.
        shadow.dispose()
        this.kept.delete(name)
        throw e
      }
      entry = { of: p, shadow }
      this.kept.set(name, entry)
      out[name] = shadow
    }
    for (const name of [...this.kept.keys()])
      if (!(name in params)) {
        this.kept.get(name)!.shadow.dispose()
        this.kept.delete(name)
      }
    this.stale = false
    return out
  }

  /** Casts every shadow again before the next step (the parameters were written elsewhere). */
  resync(): void {
    this.stale = true
  }

  dispose(): void {
    for (const { shadow } of this.kept.values()) shadow.dispose()
    this.kept.clear()
  }
}

/** dst = cast(src) on every device, outside any recording (the real backend). */
const castInto = (engine: Engine, src: ShardedArray, dst: ShardedArray): void =>
  engine.untracked(() =>
    execEach(engine, src, "cast", (p) => [src.buffer(p), dst.buffer(p)], [
      dtypeCode(src.dtype),
      dtypeCode(dst.dtype),
      numel(src.localShape),
    ]),
  )

export interface TrainStep extends Jitted<[Params, OptState, TokenBatch], StepResult> {
  /** Casts the kept compute-dtype copies again before the next call (parameters written elsewhere). */
  readonly resyncShadows: () => void
}

/**
 * The jitted train step: traced on the first batch of a shape, replayed after. Where the model
 * computes in another dtype than its parameters' (bfloat16 on float32 master weights), the step
 * keeps the parameters' compute-dtype copies (StepOptions.shadows): donated to the traced step
 * like the parameters, read by the forward pass through castTo, rewritten by the fused update.
 */
export const makeTrainStep = (
  model: CausalLM,
  optimizer: Optimizer,
  options: StepOptions = {},
): TrainStep => {
  const inner = jit(
    (params: Params, optState: OptState, batch: TokenBatch, shadows: Params): StepResult =>
      stepBody(
        model,
        optimizer,
        options,
        params,
        optState,
        batch,
        Object.keys(shadows).length > 0 ? shadows : undefined,
      ),
    { donate: [0, 1, 3], graph: options.graph ?? false },
  )
  const shadows = new CastShadows()
  const step = (params: Params, optState: OptState, batch: TokenBatch) =>
    attempt(() => ((options.shadows ?? true) ? shadows.sync(params, model.computeDtype) : undefined)).pipe(
      Effect.flatMap((sh) => inner(params, optState, batch, sh ?? {})),
    )
  forward(step, inner, () => shadows.dispose())
  Object.defineProperty(step, "resyncShadows", { value: () => shadows.resync() })
  return step as TrainStep
}

/**
 * A LoRA train step: the base parameters are frozen (closed over, never donated), only the
 * adapter pairs get gradients and updates. Where the model computes in another dtype than the
 * base's, the base's compute-dtype copies are made once, at the trace, and read by every call
 * (StepOptions.shadows): the frozen weights are not cast again each step. The step's `dispose`
 * frees them.
 */
export const makeLoraTrainStep = (
  model: CausalLM,
  optimizer: Optimizer,
  base: Params,
  alpha: number,
  options: StepOptions = {},
): Jitted<[Params, OptState, TokenBatch], { lora: Params; optState: OptState; loss: ShardedArray }> => {
  const shadows = new CastShadows()
  const inner = jit(
    (
      lora: Params,
      optState: OptState,
      batch: TokenBatch,
    ): { lora: Params; optState: OptState; loss: ShardedArray } => {
      // Made outside the recording (engine.untracked): every replay reads these very buffers.
      const sh = (options.shadows ?? true) ? shadows.sync(base, model.computeDtype) : undefined
      const { value, grads } = readingShadows(base, sh, () =>
        valueAndGrad((p: Params) =>
          model.loss(base, batch, { lora: { params: p, alpha }, remat: options.remat ?? false }),
        )(lora),
      )
      applyUpdates(optimizer, lora, grads, optState)
      for (const g of Object.values(grads)) g.dispose()
      return { lora, optState, loss: value }
    },
    { donate: [0, 1], graph: options.graph ?? false },
  )
  const step = (lora: Params, optState: OptState, batch: TokenBatch) => inner(lora, optState, batch)
  forward(step, inner, () => shadows.dispose())
  return step as typeof inner
}

/** Gives `step` the counters of `inner` and a dispose that disposes inner, then runs `after`. */
const forward = (step: object, inner: Jitted<never, unknown>, after: () => void): void => {
  Object.defineProperty(step, "traces", { get: () => inner.traces })
  Object.defineProperty(step, "graphLaunches", { get: () => inner.graphLaunches })
  Object.defineProperty(step, "graphNodes", { get: () => inner.graphNodes })
  Object.defineProperty(step, "graphError", { get: () => inner.graphError })
  Object.defineProperty(step, "graphMemory", { get: () => inner.graphMemory })
  Object.defineProperty(step, "dispose", {
    value: () => {
      // The graphs that read the shadows go first.
      inner.dispose()
      after()
    },
  })
}
