/**
 * Optimizers composed like optax — `chain(clipByGlobalNorm(1), adamw({ lr: warmupCosine(...) }),
 * skipNonFinite({ maxConsecutive: 10 }))` — and executed as one fused native pass over every
 * tensor (after one reduction for the global gradient norm), with no host synchronisation:
 * the update count, the learning rate and the skip decision all live on the device.
 *
 * Semantics follow optax: clip_by_global_norm scales by maxNorm/‖g‖ when ‖g‖ ≥ maxNorm; adamw is
 * scale_by_adam (bias-corrected) + add_decayed_weights (masked) + the learning rate at the count
 * of updates already applied; skipNonFinite is apply_if_finite around the whole chain (a step
 * with a NaN or Inf gradient changes nothing but its counters).
 */
import { Effect, Schema } from "effect"
import { dtypeCode } from "./dtype.ts"
import type { Mesh } from "./mesh.ts"
import { fillArray } from "./ops/elementwise.ts"
import { type PartitionRules, specFor } from "./partitionRules.ts"
import { numel } from "./shape.ts"
import { allocateArray, type ShardedArray, shardToHost } from "./shardedArray.ts"
import { NamedSharding, P, type ShardingError } from "./sharding.ts"

// ---------- schedules ----------

/** A learning-rate schedule: evaluated on the host for display and natively inside the update. */
export interface Schedule {
  readonly kind: 0 | 1 | 2
  readonly params: readonly [number, number, number, number, number]
  at(count: number): number
}

export const constant = (value: number): Schedule => ({
  kind: 0,
  params: [value, 0, 0, 0, 0],
  at: () => value,
})

/** optax.linear_schedule: init → end over `steps` updates, then end. */
export const linear = (o: { init: number; end: number; steps: number }): Schedule => ({
  kind: 1,
  params: [o.init, o.end, o.steps, 0, 0],
  at: (c) => o.init + ((o.end - o.init) * Math.min(c, o.steps)) / o.steps,
})

/**
 * optax.warmup_cosine_decay_schedule: linear warmup from `init` (0) to `peak` over `warmup`
 * updates, then cosine decay to `end` (0) at `total` updates (the schedule's whole length).
 */
export const warmupCosine = (o: {
  peak: number
  warmup: number
  total: number
  init?: number
  end?: number
}): Schedule => {
  const init = o.init ?? 0
  const end = o.end ?? 0
  return {
    kind: 2,
    params: [init, o.peak, o.warmup, o.total, end],
    at: (c) => {
      if (c < o.warmup) return init + ((o.peak - init) * c) / o.warmup
      const d = o.total - o.warmup
      const r = d > 0 ? Math.min(c - o.warmup, d) / d : 1
      return end + ((o.peak - end) * (1 + Math.cos(Math.PI * r))) / 2
    },
  }
}

const asSchedule = (lr: number | Schedule): Schedule => (typeof lr === "number" ? constant(lr) : lr)

// ---------- transforms ----------

export interface ClipByGlobalNorm {
  readonly _tag: "clipByGlobalNorm"
  readonly maxNorm: number
}
export interface AdamW {
  readonly _tag: "adamw"
  readonly lr: Schedule
  readonly b1: number
  readonly b2: number
  readonly eps: number
  readonly weightDecay: number
  /** Which parameters decay (true) by path; all by default. */
  readonly mask: (path: string) => boolean
}
export interface SkipNonFinite {
  readonly _tag: "skipNonFinite"
  readonly maxConsecutive: number
}
export type Transform = ClipByGlobalNorm | AdamW | SkipNonFinite

export const clipByGlobalNorm = (maxNorm: number): ClipByGlobalNorm => ({ _tag: "clipByGlobalNorm", maxNorm })

export const adamw = (o: {
  lr: number | Schedule
  b1?: number
  b2?: number
  eps?: number
  weightDecay?: number
  mask?: (path: string) => boolean
}): AdamW => ({
  _tag: "adamw",
  lr: asSchedule(o.lr),
  b1: o.b1 ?? 0.9,
  b2: o.b2 ?? 0.999,
  eps: o.eps ?? 1e-8,
  weightDecay: o.weightDecay ?? 1e-4,
  mask: o.mask ?? (() => true),
})

/** Plain Adam: AdamW without weight decay. */
export const adam = (o: { lr: number | Schedule; b1?: number; b2?: number; eps?: number }): AdamW =>
  adamw({ ...o, weightDecay: 0 })

export const skipNonFinite = (o: { maxConsecutive: number } = { maxConsecutive: 10 }): SkipNonFinite => ({
  _tag: "skipNonFinite",
  maxConsecutive: o.maxConsecutive,
})

/** No weight decay on norms and biases (Magix's decay_mask_fn, for Hugging Face names). */
export const decayMask = (path: string): boolean => !/(^|\.)bias$/.test(path) && !/norm/.test(path)

export class InvalidOptimizer extends Schema.TaggedError<InvalidOptimizer>()("InvalidOptimizer", {
  reason: Schema.String,
}) {
  override get message() {
    return `invalid optimizer chain: ${this.reason}`
  }
}

export class TooManyNonFiniteSteps extends Schema.TaggedError<TooManyNonFiniteSteps>()(
  "TooManyNonFiniteSteps",
  {
    consecutive: Schema.Number,
    maxConsecutive: Schema.Number,
  },
) {
  override get message() {
    return (
      `${this.consecutive} consecutive steps had NaN or Inf gradients (limit ${this.maxConsecutive}): ` +
      "training has diverged; the last checkpoint is kept: lower --learning-rate or --max-grad-norm and " +
      "rerun to resume from it (--max-non-finite-steps sets the limit)"
    )
  }
}

export interface Optimizer {
  readonly clip: number
  readonly adam: AdamW
  readonly skip: SkipNonFinite | undefined
}

/** optax.chain of the transforms above: one AdamW, optionally clipping and a non-finite guard. */
export const chain = (...transforms: Transform[]): Optimizer => {
  const adams = transforms.filter((t): t is AdamW => t._tag === "adamw")
  if (adams.length !== 1) throw new InvalidOptimizer({ reason: "a chain needs exactly one adamw (or adam)" })
  const adamIndex = transforms.indexOf(adams[0]!)
  const clips = transforms.filter((t): t is ClipByGlobalNorm => t._tag === "clipByGlobalNorm")
  if (clips.length > 1 || transforms.indexOf(clips[0]!) > adamIndex)
    throw new InvalidOptimizer({ reason: "clipByGlobalNorm must come before adamw, at most once" })
  const skip = transforms.find((t): t is SkipNonFinite => t._tag === "skipNonFinite")
  return { clip: clips[0]?.maxNorm ?? 0, adam: adams[0]!, skip }
}

// ---------- state ----------

/** Per-parameter moments sharded like their parameter, and the device-side scalars. */
export interface OptState {
  readonly mu: Readonly<Record<string, ShardedArray>>
  readonly nu: Readonly<Record<string, ShardedArray>>
  /**
   * float64 [8], replicated: updates applied, consecutive and total non-finite steps, last
   * gradient norm, last learning rate, steps skipped as loss spikes.
   */
  readonly scalars: ShardedArray
}

/**
 * Optimizer state born sharded (Magix's initialize_opt_state): each moment takes the spec the
 * rules give its path ("mu.<parameter>"), which is its parameter's.
 */
export const initializeOptState = (
  _optimizer: Optimizer,
  params: Readonly<Record<string, ShardedArray>>,
  rules: PartitionRules,
  mesh: Mesh,
): Effect.Effect<OptState, ShardingError> =>
  Effect.gen(function* () {
    const first = Object.values(params)[0]
    if (!first) return yield* Effect.die(new Error("initializeOptState: no parameters"))
    const engine = first.engine
    const moments = (prefix: string) =>
      Effect.gen(function* () {
        const out: Record<string, ShardedArray> = {}
        for (const [name, p] of Object.entries(params)) {
          const sharding = new NamedSharding(mesh, specFor(rules, `${prefix}.${name}`, p.shape))
          yield* sharding.validate(p.shape, `${prefix}.${name}`)
          out[name] = fillArray(engine, p.shape, p.dtype === "float64" ? "float64" : "float32", sharding, 0)
        }
        return out
      })
    const mu = yield* moments("mu")
    const nu = yield* moments("nu")
    const scalars = fillArray(engine, [8], "float64", new NamedSharding(mesh, P()), 0)
    return { mu, nu, scalars }
  })

export interface OptScalars {
  readonly count: number
  readonly consecutiveNonFinite: number
  readonly totalNonFinite: number
  /** Steps skipped as loss spikes (counted by core/stepGuard.ts, not by the kernel). */
  readonly lossSpikes: number
  readonly gradNorm: number
  readonly learningRate: number
}

/** Reads the device scalars (a host synchronisation: do it when printing). */
export const readScalars = (state: OptState): OptScalars =>
  scalarsOf(shardToHost(state.scalars, 0) as Float64Array)

/** The scalars from their host copy (a read of `OptState.scalars`, e.g. one finished later). */
export const scalarsOf = (s: Float64Array): OptScalars => {
  return {
    count: s[0]!,
    consecutiveNonFinite: s[1]!,
    totalNonFinite: s[2]!,
    lossSpikes: s[5]!,
    gradNorm: s[3]!,
    learningRate: s[4]!,
  }
}

/** Fails once more consecutive steps were skipped than the optimizer allows. */
export const checkFinite = (
  optimizer: Optimizer,
  scalars: OptScalars,
): Effect.Effect<void, TooManyNonFiniteSteps> =>
  optimizer.skip && scalars.consecutiveNonFinite > optimizer.skip.maxConsecutive
    ? Effect.fail(
        new TooManyNonFiniteSteps({
          consecutive: scalars.consecutiveNonFinite,
          maxConsecutive: optimizer.skip.maxConsecutive,
        }),
      )
    : Effect.void

/**
 * Applies one update in place to params and state, consuming grads (they are left unchanged but
 * may be disposed by the caller). Grads must be sharded like their parameters. With `shadows`
 * (a copy of every parameter in one other dtype, laid out as the parameter), the same pass also
 * writes each updated parameter into its shadow, rounded as castTo rounds (train.ts keeps them
 * for the forward pass).
 */
export const applyUpdates = (
  optimizer: Optimizer,
  params: Readonly<Record<string, ShardedArray>>,
  grads: Readonly<Record<string, ShardedArray>>,
  state: OptState,
  shadows?: Readonly<Record<string, ShardedArray>>,
): void => {
  const names = Object.keys(params)
  const first = params[names[0]!]!
  const engine = first.engine
  const mesh = first.mesh
  const shadowList = shadows
    ? names.map((name) => {
        const s = shadows[name]
        const p = params[name]!
        if (!s || s.sharding.mesh !== mesh || numel(s.localShape) !== numel(p.localShape))
          throw new Error(`applyUpdates: no shadow laid out like ${name}`)
        return s
      })
    : undefined
  const shadowDtype = shadowList?.[0]?.dtype
  if (shadowList?.some((s) => s.dtype !== shadowDtype))
    throw new Error("applyUpdates: the shadows must all have one dtype")
  // Σ g² over distinct elements: each device weighs its blocks by 1/replication, then all sum.
  // One sumsq_multi per device (per gradient dtype) over every gradient: two launches on CUDA
  // instead of two per tensor.
  const normSq = allocateArray(engine, [], "float64", new NamedSharding(mesh, P()), [...mesh.axisNames])
  try {
    const byDtype = new Map<string, ShardedArray[]>()
    for (const name of names) {
      const g = grads[name]
      if (!g) throw new Error(`applyUpdates: no gradient for ${name}`)
      const list = byDtype.get(g.dtype)
      if (list) list.push(g)
      else byDtype.set(g.dtype, [g])
    }
    let accumulate = 0
    for (const gs of byDtype.values()) {
      const args = [dtypeCode(gs[0]!.dtype), gs.length, accumulate]
      for (const g of gs) args.push(numel(g.localShape), 1 / g.sharding.replication)
      for (let p = 0; p < mesh.size; p++)
        engine.backend.exec("sumsq_multi", [...gs.map((g) => g.buffer(p)), normSq.buffer(p)], args)
      accumulate = 1
    }
    const total = engine.collectives.allReduce(normSq, mesh.axisNames)
    try {
      const { adam, clip, skip } = optimizer
      const dtype = first.dtype
      const args = [
        dtypeCode(dtype),
        names.length,
        adam.b1,
        adam.b2,
        adam.eps,
        clip,
        skip ? 1 : 0,
        adam.lr.kind,
        ...adam.lr.params,
      ]
      for (const name of names)
        args.push(numel(params[name]!.localShape), adam.mask(name) ? adam.weightDecay : 0)
      if (shadowDtype !== undefined) args.push(dtypeCode(shadowDtype))
      for (let p = 0; p < mesh.size; p++) {
        const buffers = [state.scalars.buffer(p), total.buffer(p)]
        for (const name of names)
          buffers.push(
            params[name]!.buffer(p),
            grads[name]!.buffer(p),
            state.mu[name]!.buffer(p),
            state.nu[name]!.buffer(p),
          )
        if (shadowList) for (const s of shadowList) buffers.push(s.buffer(p))
        engine.backend.exec("adamw", buffers, args)
      }
    } finally {
      total.dispose()
    }
  } finally {
    normSq.dispose()
  }
}
