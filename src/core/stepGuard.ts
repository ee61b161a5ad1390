/**
 * A train step that looks at the loss before the update is applied: gradients in one jitted
 * program, a decision on the host, then the optimizer update in a second one. It costs a host
 * synchronisation per step, so the plain fused step stays the default; this one runs when a loss
 * spike policy (`--skip-loss-spikes`) or a test's fault injection is on.
 *
 * Skipped loss spikes are counted in the optimizer's device scalars (slot 5, reserved by the
 * adamw kernel), so the count is checkpointed and survives a resume like the non-finite count.
 */
import { Effect, Schema } from "effect"
import { valueAndGrad } from "./autodiff.ts"
import { dtypeCode } from "./dtype.ts"
import type { DeviceError } from "./errors.ts"
import { jit } from "./jit.ts"
import type { Params, TokenBatch } from "./models/decoder.ts"
import { applyUpdates, type Optimizer, type OptState } from "./optim.ts"
import { numel } from "./shape.ts"
import { type ShardedArray, shardToHost } from "./shardedArray.ts"

/** Slot of the optimizer scalars that counts steps skipped as loss spikes. */
export const LOSS_SPIKES_SLOT = 5

export interface LossSpikePolicy {
  /** A step whose loss exceeds factor × the mean of the recent accepted losses is skipped. */
  readonly factor: number
  /** How many recent accepted losses the mean is over. */
  readonly window: number
  /** No step is judged before this many losses were accepted (the first steps move fast). */
  readonly minHistory: number
  /** More consecutive spikes than this fail the run: the loss has moved, not spiked. */
  readonly maxConsecutive: number
}

export const defaultLossSpikePolicy: LossSpikePolicy = {
  factor: 3,
  window: 32,
  minHistory: 8,
  maxConsecutive: 10,
}

export class TooManyLossSpikes extends Schema.TaggedError<TooManyLossSpikes>()("TooManyLossSpikes", {
  step: Schema.Number,
  consecutive: Schema.Number,
  loss: Schema.Number,
  mean: Schema.Number,
}) {
  override get message() {
    return (
      `${this.consecutive} consecutive steps up to step ${this.step} were skipped as loss spikes ` +
      `(last loss ${this.loss.toPrecision(4)}, recent mean ${this.mean.toPrecision(4)}): the loss has ` +
      "moved for good; lower --learning-rate and resume from the last checkpoint, or raise --loss-spike-factor"
    )
  }
}

/** The running mean of recent accepted losses, and the verdict on a new one. */
export const lossSpikeDetector = (policy: LossSpikePolicy) => {
  const recent: number[] = []
  let sum = 0
  return {
    mean: (): number => (recent.length === 0 ? Number.NaN : sum / recent.length),
    /** Non-finite losses are not spikes: the optimizer's non-finite guard owns them. */
    isSpike: (loss: number): boolean =>
      Number.isFinite(loss) &&
      recent.length >= policy.minHistory &&
      loss > (policy.factor * sum) / recent.length,
    accept: (loss: number): void => {
      if (!Number.isFinite(loss)) return
      recent.push(loss)
      sum += loss
      if (recent.length > policy.window) sum -= recent.shift()!
    },
  }
}

/** Adds one to the loss spike count in the replicated optimizer scalars. */
export const countLossSpike = (state: OptState): void => {
  const s = state.scalars
  const next = Float64Array.of((shardToHost(s, 0) as Float64Array)[LOSS_SPIKES_SLOT]! + 1)
  for (let p = 0; p < s.mesh.size; p++) s.engine.backend.write(s.buffer(p), LOSS_SPIKES_SLOT * 8, next)
}

/**
 * Overwrites one gradient with NaN on every device: fault injection for tests of the non-finite
 * guard (the whole global norm becomes NaN, so the optimizer must skip the update).
 */
export const poisonGradients = (grads: Params): void => {
  const g = Object.values(grads)[0]
  if (!g) return
  const n = numel(g.localShape)
  for (let p = 0; p < g.mesh.size; p++)
    g.engine.backend.exec("fill", [g.buffer(p)], [dtypeCode(g.dtype), n, Number.NaN])
}

/**
 * The split step. `decide` sees the loss and gradients after the backward pass and says whether
 * to apply the update (it may also poison the gradients); the gradients are freed either way.
 */
export const makeGuardedStep = (
  lossFn: (params: Params, batch: TokenBatch) => ShardedArray,
  optimizer: Optimizer,
) => {
  const gradients = jit((params: Params, batch: TokenBatch) => {
    const { value, grads } = valueAndGrad((p: Params) => lossFn(p, batch))(params)
    return { loss: value, grads }
  })
  const update = jit(
    (params: Params, grads: Params, optState: OptState) => {
      applyUpdates(optimizer, params, grads, optState)
      return { params, optState }
    },
    { donate: [0, 2] },
  )
  const step = <E>(
    params: Params,
    optState: OptState,
    batch: TokenBatch,
    decide: (loss: ShardedArray, grads: Params) => Effect.Effect<boolean, E>,
  ): Effect.Effect<{ readonly loss: ShardedArray; readonly applied: boolean }, E | DeviceError> =>
    Effect.gen(function* () {
      const { loss, grads } = yield* gradients(params, batch)
      return yield* Effect.gen(function* () {
        const applied = yield* decide(loss, grads)
        if (applied) yield* update(params, grads, optState)
        return { loss, applied }
      }).pipe(
        Effect.onError(() => Effect.sync(() => loss.dispose())),
        Effect.ensuring(Effect.sync(() => Object.values(grads).forEach((g) => g.dispose()))),
      )
    })
  return Object.assign(step, {
    dispose: () => {
      gradients.dispose()
      update.dispose()
    },
  })
}
