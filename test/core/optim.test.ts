/**
 * Optimizers against the references no one here wrote: five AdamW steps with clipping and a decay
 * mask against torch.optim.AdamW + clip_grad_norm_ (float64 on both sides, so what is compared is
 * the optimizer's arithmetic), and schedules against optax.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { placeBatch } from "../../src/core/models/batch.ts"
import { LlamaForCausalLM } from "../../src/core/models/decoder.ts"
import {
  adamw,
  applyUpdates,
  chain,
  checkFinite,
  clipByGlobalNorm,
  constant,
  decayMask,
  initializeOptState,
  linear,
  readScalars,
  skipNonFinite,
  warmupCosine,
} from "../../src/core/optim.ts"
import { fromHost, shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { trainStepFn } from "../../src/core/train.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { fixtures, mesh, readReference, referenceBatch, relErr, runCpu } from "../helpers.ts"

const schedules = JSON.parse(readFileSync(join(fixtures, "optax", "schedules.json"), "utf8")) as Record<
  string,
  Record<string, number> & { values: number[] }
>

describe("schedules match optax", () => {
  it("warmup-cosine, linear and constant at every step, on the host", () => {
    const wc = schedules.warmup_cosine!
    const s1 = warmupCosine({
      init: wc.init!,
      peak: wc.peak!,
      warmup: wc.warmup!,
      total: wc.decay_steps!,
      end: wc.end!,
    })
    const li = schedules.linear!
    const s2 = linear({ init: li.init!, end: li.end!, steps: li.steps! })
    const s3 = constant(schedules.constant!.value!)
    // optax computes in float32.
    // optax computes in float32: agreement to float32 rounding of the schedule's scale (1e-3).
    const close = (a: number, b: number) => expect(Math.abs(a - b)).toBeLessThanOrEqual(1e-9)
    wc.values.forEach((v, c) => close(s1.at(c), v))
    li.values.forEach((v, c) => close(s2.at(c), v))
    schedules.constant!.values.forEach((v, c) => close(s3.at(c), v))
  })

  it("the fused update evaluates the same schedule on the device", async () => {
    const wc = schedules.warmup_cosine!
    const lrs = await runCpu(
      1,
      Effect.gen(function* () {
        const { engine } = yield* Devices
        const m = mesh([1, 1])
        const s = new NamedSharding(m, P())
        const p = yield* fromHost(engine, Float32Array.from([1, 2, 3]), [3], "float32", s)
        const g = yield* fromHost(engine, Float32Array.from([0.1, -0.2, 0.3]), [3], "float32", s)
        const opt = chain(
          adamw({
            lr: warmupCosine({
              init: wc.init!,
              peak: wc.peak!,
              warmup: wc.warmup!,
              total: wc.decay_steps!,
              end: wc.end!,
            }),
          }),
        )
        const st = yield* initializeOptState(opt, { p }, [], m)
        const out: number[] = []
        for (let i = 0; i < 40; i++) {
          applyUpdates(opt, { p }, { p: g }, st)
          out.push(readScalars(st).learningRate)
        }
        return out
      }),
    )
    lrs.forEach((lr, c) =>
      expect(Math.abs(lr - wc.values[c]!)).toBeLessThanOrEqual(1e-6 * wc.values[c]! + 1e-12),
    )
  })
})

describe("AdamW matches torch.optim.AdamW", () => {
  it("five steps with clipping and no decay on norms: losses, gradient norms and parameters", async () => {
    const ref = JSON.parse(readFileSync(join(fixtures, "hf", "adamw", "llama.json"), "utf8")) as {
      lr: number
      b1: number
      b2: number
      eps: number
      weight_decay: number
      max_grad_norm: number
      losses: number[]
      grad_norms: number[]
    }
    const result = await runCpu(
      1,
      Effect.gen(function* () {
        const { engine } = yield* Devices
        const m = mesh([1, 1])
        const { model, params } = yield* loadModelHub(
          LlamaForCausalLM,
          "llama",
          LlamaForCausalLM.partitionRules,
          m,
          {
            dtype: "float64",
          },
        )
        model.computeDtype = "float64"
        const after = yield* readReference(join(fixtures, "hf", "adamw", "llama.safetensors"))
        const inputs = yield* readReference(join(fixtures, "hf", "llama", "reference.safetensors"))
        const { batch } = yield* placeBatch(engine, m, referenceBatch(inputs), "float64")
        const optimizer = chain(
          clipByGlobalNorm(ref.max_grad_norm),
          adamw({
            lr: ref.lr,
            b1: ref.b1,
            b2: ref.b2,
            eps: ref.eps,
            weightDecay: ref.weight_decay,
            mask: decayMask,
          }),
          skipNonFinite(),
        )
        const optState = yield* initializeOptState(optimizer, params, LlamaForCausalLM.partitionRules, m)
        const step = trainStepFn(model, optimizer)
        const losses: number[] = []
        const norms: number[] = []
        for (let i = 0; i < 5; i++) {
          const out = engine.tidy(() => step(params, optState, batch))
          losses.push(Number(shardToHost(out.loss, 0)[0]))
          norms.push(readScalars(optState).gradNorm)
        }
        const errors: Record<string, number> = {}
        for (const [name, p] of Object.entries(params))
          errors[name] = relErr(toHost(p) as Float64Array, after[`after.${name}`]!.data)
        return { losses, norms, errors }
      }),
    )
    // transformers computes RoPE's cos and sin in float32 even in a float64 model: ~1e-7 apart.
    result.losses.forEach((l, i) => expect(relErr([l], [ref.losses[i]!]), `loss ${i}`).toBeLessThan(1e-6))
    result.norms.forEach((n, i) => expect(relErr([n], [ref.grad_norms[i]!]), `norm ${i}`).toBeLessThan(1e-6))
    // The references are float32 copies of float64 results: agreement to their rounding.
    for (const [name, e] of Object.entries(result.errors)) expect(e, name).toBeLessThan(1e-5)
  })

  it("a non-finite gradient is skipped and counted; too many in a row is a typed error", async () => {
    const outcome = await runCpu(
      1,
      Effect.gen(function* () {
        const { engine } = yield* Devices
        const m = mesh([1, 1])
        const s = new NamedSharding(m, P())
        const p = yield* fromHost(engine, Float32Array.from([1, 2]), [2], "float32", s)
        const good = yield* fromHost(engine, Float32Array.from([0.5, 0.5]), [2], "float32", s)
        const bad = yield* fromHost(engine, Float32Array.from([Number.NaN, 1]), [2], "float32", s)
        const opt = chain(adamw({ lr: 0.1 }), skipNonFinite({ maxConsecutive: 2 }))
        const st = yield* initializeOptState(opt, { p }, [], m)
        applyUpdates(opt, { p }, { p: good }, st)
        const afterGood = Array.from(toHost(p) as Float32Array)
        applyUpdates(opt, { p }, { p: bad }, st)
        applyUpdates(opt, { p }, { p: bad }, st)
        const afterBad = Array.from(toHost(p) as Float32Array)
        const twoSkipped = readScalars(st)
        const ok = yield* Effect.exit(checkFinite(opt, twoSkipped))
        applyUpdates(opt, { p }, { p: bad }, st)
        const err = yield* Effect.flip(checkFinite(opt, readScalars(st)))
        return { afterGood, afterBad, twoSkipped, ok: ok._tag, err }
      }),
    )
    expect(outcome.afterBad).toEqual(outcome.afterGood)
    expect(outcome.twoSkipped.count).toBe(1)
    expect(outcome.twoSkipped.consecutiveNonFinite).toBe(2)
    expect(outcome.twoSkipped.totalNonFinite).toBe(2)
    expect(outcome.ok).toBe("Success")
    expect(outcome.err._tag).toBe("TooManyNonFiniteSteps")
  })
})
