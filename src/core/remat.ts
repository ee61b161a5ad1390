/**
 * Rematerialisation (activation checkpointing, `jax.checkpoint`, PyTorch's
 * `torch.utils.checkpoint`): `remat(inputs, fn)` runs fn without keeping what its backward pass
 * would need, and records one tape node that, when the gradient reaches it, runs fn again on the
 * same inputs with a tape of its own and backpropagates through that. A decoder layer then keeps
 * only its input between the forward and backward passes, not the dozen activations inside it,
 * at the cost of one more forward pass of the layer.
 *
 * `inputs` must list every array fn reads that may need a gradient (the layer's input and its
 * parameters); anything else fn reads is a constant. fn must compute the same values when run
 * again (the decoder has no dropout or other randomness).
 */
import { backprop, record, Tape } from "./autodiff.ts"
import type { ShardedArray } from "./shardedArray.ts"

export const remat = (inputs: ReadonlyArray<ShardedArray>, fn: () => ShardedArray): ShardedArray => {
  const engine = inputs[0]!.engine
  const outer = engine.tape
  if (!outer?.needsGrad(inputs)) return fn()
  // Forward with no tape: ops keep nothing for a backward pass, and fn's temporaries go at once.
  engine.tape = undefined
  let y: ShardedArray
  try {
    y = engine.tidy(fn)
  } finally {
    engine.tape = outer
  }
  // Only the inputs the outer tape differentiates: frozen weights stay frozen inside too.
  const tracked = inputs.filter((x) => outer.tracked.has(x))
  record(engine, {
    name: "remat",
    inputs: tracked,
    outputs: [y],
    backward: ([ct]) => {
      if (!ct) return tracked.map(() => undefined)
      return engine.tidy(() => {
        const inner = new Tape()
        for (const x of tracked) inner.tracked.add(x)
        const saved = engine.tape
        engine.tape = inner
        let again: ShardedArray
        try {
          again = fn()
        } finally {
          engine.tape = saved
        }
        const cts = new Map<ShardedArray, ShardedArray>([[again, ct]])
        // `again` is kept by backprop so the cotangent handed in (owned by the outer pass) is
        // never freed here; tidy frees `again` and the rest when this returns.
        backprop(engine, inner, cts, new Set([...tracked, again]))
        return tracked.map((x) => cts.get(x))
      })
    },
  })
  return y
}
