/**
 * One training run of the equivalence suite: a fixture model under some partition rules on some
 * mesh, its first gradients, three AdamW steps' losses and the final parameters. Shared by the CPU
 * suite (test/parallel/equivalence.test.ts) and the GPU one (test/gpu/equivalence.test.ts).
 */
import { Effect, type Scope } from "effect"
import { expect } from "vitest"
import { valueAndGrad } from "../../src/core/autodiff.ts"
import type { HostTokenBatch } from "../../src/core/models/batch.ts"
import { placeBatch } from "../../src/core/models/batch.ts"
import type { Params } from "../../src/core/models/decoder.ts"
import { modelClassFor } from "../../src/core/models/decoder.ts"
import { adamw, chain, clipByGlobalNorm, decayMask, initializeOptState } from "../../src/core/optim.ts"
import { type PartitionRules, rulesWithout } from "../../src/core/partitionRules.ts"
import { shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { makeTrainStep } from "../../src/core/train.ts"
import { Devices } from "../../src/layers/Devices.ts"
import type { Hub } from "../../src/layers/Hub.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { mesh, runCpu } from "../helpers.ts"

/** Runs an effect on a runtime of n devices (the CPU backend unless told otherwise). */
export type Runner = <A, E>(
  devices: number,
  effect: Effect.Effect<A, E, Devices | Hub | Scope.Scope>,
) => Promise<A>

const B = 8
const T = 12

/** A fixed batch: random tokens, some rows right-padded, the first targets of row 0 ignored. */
export const makeBatch = (vocab: number): HostTokenBatch => {
  let s = 12345
  const rand = () => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0
    return s / 2 ** 32
  }
  const inputIds = new Int32Array(B * T)
  const attentionMask = new Uint8Array(B * T).fill(1)
  const positions = new Int32Array(B * T)
  const targets = new Int32Array(B * T).fill(-100)
  for (let b = 0; b < B; b++) {
    const len = T - (b % 3) * 2
    for (let t = 0; t < T; t++) {
      inputIds[b * T + t] = t < len ? 3 + Math.floor(rand() * (vocab - 3)) : 0
      attentionMask[b * T + t] = t < len ? 1 : 0
      positions[b * T + t] = t
    }
    for (let t = 0; t < len - 1; t++) targets[b * T + t] = inputIds[b * T + t + 1]!
  }
  targets[0] = -100
  return { batchSize: B, length: T, inputIds, positions, targets, attentionMask }
}

export const meshes: Array<[number, number]> = [
  [1, 1],
  [4, 1],
  [1, 4],
  [2, 2],
  [2, 4],
]

export const train = (
  family: "llama" | "mistral" | "gemma",
  shape: [number, number],
  rules: (r: PartitionRules) => PartitionRules,
  run: Runner = runCpu,
) =>
  run(
    shape[0] * shape[1],
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh(shape)
      const Model = modelClassFor(family)
      const r = rules(Model.partitionRules)
      const { model, params } = yield* loadModelHub(Model, family, r, m)
      const optimizer = chain(
        clipByGlobalNorm(1.0),
        adamw({ lr: 1e-3, b1: 0.9, b2: 0.95, weightDecay: 0.1, mask: decayMask }),
      )
      const optState = yield* initializeOptState(optimizer, params, r, m)
      const { batch } = yield* placeBatch(engine, m, makeBatch(model.config.vocabSize))
      const grads: Record<string, Float32Array> = {}
      engine.tidy(() => {
        const { grads: g } = valueAndGrad((p: Params) => model.loss(p, batch))(params)
        for (const [name, a] of Object.entries(g)) {
          expect(a.sharding.spec.equals(params[name]!.sharding.spec)).toBe(true)
          grads[name] = toHost(a) as Float32Array
        }
      })
      const step = makeTrainStep(model, optimizer)
      const losses: number[] = []
      for (let i = 0; i < 3; i++) {
        const out = yield* step(params, optState, batch)
        losses.push(Number(shardToHost(out.loss, 0)[0]))
        out.loss.dispose()
      }
      const final: Record<string, Float32Array> = {}
      for (const [name, p] of Object.entries(params)) final[name] = toHost(p) as Float32Array
      return { losses, params: final, grads, traces: step.traces }
    }),
  )

export const ruleSets: Record<string, (r: PartitionRules) => PartitionRules> = {
  replicated: () => [],
  fsdp: (r) => rulesWithout(r, "model"),
  tensor: (r) => rulesWithout(r, "data"),
  default: (r) => r,
}
