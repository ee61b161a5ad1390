/** Gated MLP activation: h = act(g)·u with act SiLU (Llama, Mistral) or tanh-GELU (Gemma). */
import { record } from "../autodiff.ts"
import { dtypeCode } from "../dtype.ts"
import { numel } from "../shape.ts"
import type { ShardedArray } from "../shardedArray.ts"
import { cotangentIn, toLayout } from "./layout.ts"
import { newArray } from "./local.ts"

export type GluActivation = "silu" | "gelu_tanh"
const activationCode: Record<GluActivation, number> = { silu: 0, gelu_tanh: 1 }

export const glu = (g: ShardedArray, u: ShardedArray, activation: GluActivation): ShardedArray => {
  const gs = toLayout(g, g.spec)
  const us = toLayout(u, gs.spec)
  const h = newArray(gs, gs.shape, gs.spec)
  const n = numel(gs.localShape)
  const args = [dtypeCode(g.dtype), n, activationCode[activation]]
  for (let p = 0; p < gs.mesh.size; p++)
    gs.engine.backend.exec("glu_fwd", [gs.buffer(p), us.buffer(p), h.buffer(p)], args)
  record(g.engine, {
    name: "glu",
    inputs: [gs, us],
    outputs: [h],
    backward: ([ct]) => {
      if (!ct) return [undefined, undefined]
      const dh = cotangentIn(ct, h)
      const dg = newArray(gs, gs.shape, gs.spec)
      const du = newArray(gs, gs.shape, gs.spec)
      for (let p = 0; p < gs.mesh.size; p++)
        gs.engine.backend.exec(
          "glu_bwd",
          [gs.buffer(p), us.buffer(p), dh.buffer(p), dg.buffer(p), du.buffer(p)],
          args,
        )
      if (dh !== ct) dh.dispose()
      return [dg, du]
    },
  })
  return h
}
