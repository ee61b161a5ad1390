/**
 * The train step as one traced program: loss and gradients by reverse mode, then the fused
 * optimizer update written into the parameters and moments in place (they are donated).
 */
import { valueAndGrad } from "./autodiff.ts"
import { jit } from "./jit.ts"
import type { CausalLM, Params, TokenBatch } from "./models/decoder.ts"
import { applyUpdates, type Optimizer, type OptState } from "./optim.ts"
import type { ShardedArray } from "./shardedArray.ts"

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
}

/** The loss and update of one batch, unjitted (for tests and for steps that change shape). */
export const trainStepFn =
  (model: CausalLM, optimizer: Optimizer, options: StepOptions = {}) =>
  (params: Params, optState: OptState, batch: TokenBatch): StepResult => {
    const remat = options.remat ?? false
    const { value, grads } = valueAndGrad((p: Params) => model.loss(p, batch, { remat }))(params)
    applyUpdates(optimizer, params, grads, optState)
    for (const g of Object.values(grads)) g.dispose()
    return { params, optState, loss: value }
  }

/** The jitted train step: traced on the first batch of a shape, replayed after. */
export const makeTrainStep = (model: CausalLM, optimizer: Optimizer, options: StepOptions = {}) =>
  jit(trainStepFn(model, optimizer, options), { donate: [0, 1], graph: options.graph ?? false })

/**
 * A LoRA train step: the base parameters are frozen (closed over, never donated), only the
 * adapter pairs get gradients and updates.
 */
export const makeLoraTrainStep = (
  model: CausalLM,
  optimizer: Optimizer,
  base: Params,
  alpha: number,
  options: StepOptions = {},
) =>
  jit(
    (
      lora: Params,
      optState: OptState,
      batch: TokenBatch,
    ): { lora: Params; optState: OptState; loss: ShardedArray } => {
      const { value, grads } = valueAndGrad((p: Params) =>
        model.loss(base, batch, { lora: { params: p, alpha }, remat: options.remat ?? false }),
      )(lora)
      applyUpdates(optimizer, lora, grads, optState)
      for (const g of Object.values(grads)) g.dispose()
      return { lora, optState, loss: value }
    },
    { donate: [0, 1], graph: options.graph ?? false },
  )
