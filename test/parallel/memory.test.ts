/**
 * Memory on the mesh: parameter and optimizer bytes on each device are the totals divided by each
 * array's sharding factor, for every rule set; a jitted step's memory does not grow over 20
 * steps; loading reads one block at a time; heads that cannot be split are a typed error.
 */
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { placeBatch } from "../../src/core/models/batch.ts"
import { LlamaForCausalLM } from "../../src/core/models/decoder.ts"
import { adamw, chain, initializeOptState } from "../../src/core/optim.ts"
import { rulesWithout } from "../../src/core/partitionRules.ts"
import { numel } from "../../src/core/shape.ts"
import { makeTrainStep } from "../../src/core/train.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { mesh, runCpu } from "../helpers.ts"

const rules = {
  replicated: [],
  fsdp: rulesWithout(LlamaForCausalLM.partitionRules, "model"),
  tensor: rulesWithout(LlamaForCausalLM.partitionRules, "data"),
  default: LlamaForCausalLM.partitionRules,
}

describe("bytes per device", () => {
  it.each(Object.entries(rules))(
    "%s rules on a 2×2 mesh: parameters and moments are total / sharding factor",
    async (_, r) => {
      const { perDevice, expected } = await runCpu(
        4,
        Effect.gen(function* () {
          const devices = yield* Devices
          const m = mesh([2, 2])
          const { params } = yield* loadModelHub(LlamaForCausalLM, "llama", r, m)
          const opt = chain(adamw({ lr: 1e-3 }))
          yield* initializeOptState(opt, params, r, m)
          let expected = 0
          for (const p of Object.values(params)) {
            const factor = m.size / p.sharding.replication
            expect(p.bytesPerDevice * factor).toBe(numel(p.shape) * 4)
            expected += (numel(p.shape) * 4) / factor
          }
          // parameters + two moments + the optimizer's eight float64 scalars
          expected = expected * 3 + 64
          const perDevice = yield* Effect.all([0, 1, 2, 3].map((d) => devices.memory(d)))
          return { perDevice: perDevice.map((s) => s.inUse), expected }
        }),
      )
      expect(perDevice).toEqual([expected, expected, expected, expected])
    },
  )
})

it("a jitted step does not grow per-device memory over 20 steps, and reports its activations", async () => {
  const { inUse, activations } = await runCpu(
    4,
    Effect.gen(function* () {
      const devices = yield* Devices
      const m = mesh([2, 2])
      const { model, params } = yield* loadModelHub(
        LlamaForCausalLM,
        "llama",
        LlamaForCausalLM.partitionRules,
        m,
      )
      const opt = chain(adamw({ lr: 1e-3 }))
      const st = yield* initializeOptState(opt, params, LlamaForCausalLM.partitionRules, m)
      const step = makeTrainStep(model, opt)
      const ids = Int32Array.from({ length: 4 * 16 }, (_, i) => 3 + (i % 250))
      const { batch } = yield* placeBatch(devices.engine, m, {
        batchSize: 4,
        length: 16,
        inputIds: ids,
        positions: Int32Array.from(ids, (_, i) => i % 16),
        targets: Int32Array.from(ids, (_, i) => (i % 16 === 15 ? -100 : ids[i + 1]!)),
      })
      const inUse: number[][] = []
      const activations: number[] = []
      for (let s = 0; s < 20; s++) {
        const before = yield* Effect.all([0, 1, 2, 3].map((d) => devices.memory(d)))
        for (let d = 0; d < 4; d++) yield* devices.resetPeak(d)
        const out = yield* step(params, st, batch)
        out.loss.dispose()
        const after = yield* Effect.all([0, 1, 2, 3].map((d) => devices.memory(d)))
        inUse.push(after.map((a) => a.inUse))
        if (s === 0) for (let d = 0; d < 4; d++) activations.push(after[d]!.peak - before[d]!.inUse)
      }
      return { inUse, activations }
    }),
  )
  // The first step makes the RoPE table; from then on nothing accumulates.
  for (const row of inUse.slice(1)) expect(row).toEqual(inUse[1])
  for (const a of activations) expect(a).toBeGreaterThan(0)
})

it("loading places every parameter one block at a time: host memory bounded by the largest block", async () => {
  const stats = { maxHostBlockBytes: 0, bytesRead: 0 }
  const largest = await runCpu(
    4,
    Effect.gen(function* () {
      const m = mesh([2, 2])
      const { params } = yield* loadModelHub(LlamaForCausalLM, "llama", LlamaForCausalLM.partitionRules, m, {
        stats,
      })
      return Math.max(...Object.values(params).map((p) => p.bytesPerDevice))
    }),
  )
  expect(stats.maxHostBlockBytes).toBeGreaterThan(0)
  expect(stats.maxHostBlockBytes).toBeLessThanOrEqual(largest)
  // Each distinct block is read once: the file's parameter bytes exactly.
  expect(stats.bytesRead).toBe(106816 * 4)
})

it("heads a mesh axis cannot split are a typed error naming the rule and the axis", async () => {
  const err = await runCpu(
    8,
    Effect.flip(
      loadModelHub(
        LlamaForCausalLM,
        "llama",
        rulesWithout(LlamaForCausalLM.partitionRules, "data"),
        mesh([1, 8]),
      ),
    ),
  )
  expect(err._tag).toBe("HeadsNotDivisible")
  expect(err.message).toContain("k_proj")
  expect(err.message).toContain("model")
})
