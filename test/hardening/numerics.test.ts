/**
 * Numerics faults: NaN gradients injected into chosen steps are skipped (parameters and moments
 * unchanged) and counted in the metrics; a run that keeps producing them stops with a typed
 * error and keeps a restorable checkpoint; loss spikes are skipped under a policy.
 */
import { mkdtempSync, readFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { lossSpikeDetector } from "../../src/core/stepGuard.ts"
import { runTraining, type StepMetrics, type TrainOptions } from "../../src/layers/Training.ts"
import { checkpointFiles, restoreStep, tinyOptions, trainingLayer } from "./training.ts"

const temp = (name: string) => mkdtempSync(join(tmpdir(), `magix-${name}-`))

const readMetrics = (path: string): StepMetrics[] =>
  readFileSync(path, "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as StepMetrics)

const train = (dir: string, saveInterval: number, o: Partial<TrainOptions>) =>
  Effect.runPromise(
    runTraining({ ...tinyOptions, ...o }).pipe(
      Effect.map((r) => ({ steps: r.steps, startStep: r.startStep })),
      Effect.scoped,
      Effect.provide(trainingLayer(dir, saveInterval)),
    ),
  )

describe("non-finite gradients", () => {
  it("an injected NaN step is skipped, counted, and leaves parameters and moments unchanged", async () => {
    const dir = temp("nan")
    const metricsFile = join(dir, "metrics.jsonl")
    const bad = new Set([3, 4])
    await train(dir, 1, { maxSteps: 6, metricsFile, injectNonFiniteGradients: (s) => bad.has(s) })
    const m = readMetrics(metricsFile)
    expect(m.map((x) => x.skippedSteps)).toEqual([0, 0, 1, 2, 2, 2])
    // The loss of a poisoned step is still the real one: only its gradients were overwritten.
    expect(m.every((x) => Number.isFinite(x.loss))).toBe(true)
    expect(checkpointFiles(dir, 3)).toEqual(checkpointFiles(dir, 2))
    expect(checkpointFiles(dir, 4)).toEqual(checkpointFiles(dir, 2))
    const moments = (s: number) => {
      const f = checkpointFiles(dir, s, "optState")
      return Object.fromEntries(Object.entries(f).filter(([k]) => !k.startsWith("scalars")))
    }
    expect(moments(4)).toEqual(moments(2))
    expect(checkpointFiles(dir, 5)).not.toEqual(checkpointFiles(dir, 4))
  })

  it("more consecutive non-finite steps than allowed stop the run with a typed error; the last checkpoint restores", async () => {
    const dir = temp("diverged")
    const error = await train(dir, 2, {
      maxSteps: 20,
      maxConsecutiveNonFinite: 3,
      injectNonFiniteGradients: (s) => s >= 5,
    }).then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(error).toMatchObject({ _tag: "TooManyNonFiniteSteps", consecutive: 4, maxConsecutive: 3 })
    expect((error as Error).message).toMatch(/NaN or Inf.*lower --learning-rate/)
    // Steps 5-8 were skipped, so the step 6 checkpoint holds step 4's parameters: still good.
    expect(checkpointFiles(dir, 6)).toEqual(checkpointFiles(dir, 4))
    const restored = await Effect.runPromise(
      restoreStep(6).pipe(Effect.scoped, Effect.provide(trainingLayer(dir, 2))),
    )
    expect(restored.finite).toBe(true)
    // And training resumes from it once the fault is gone.
    const resumed = await train(dir, 2, { maxSteps: 8, maxConsecutiveNonFinite: 3 })
    expect(resumed).toEqual({ steps: 8, startStep: 6 })
  })
})

describe("loss spikes", () => {
  it("the detector compares with the mean of the recent accepted losses, after a warm-up", () => {
    const d = lossSpikeDetector({ factor: 2, window: 3, minHistory: 2, maxConsecutive: 5 })
    expect(d.isSpike(100)).toBe(false)
    d.accept(1)
    d.accept(2)
    expect(d.isSpike(3.1)).toBe(true)
    expect(d.isSpike(2.9)).toBe(false)
    expect(d.isSpike(Number.NaN)).toBe(false)
    d.accept(3)
    d.accept(4) // the window drops 1: mean 3
    expect(d.isSpike(6.1)).toBe(true)
    expect(d.isSpike(5.9)).toBe(false)
  })

  it("a step whose loss spikes is skipped before its update and counted", async () => {
    const dir = temp("spikes")
    const metricsFile = join(dir, "metrics.jsonl")
    // While the loss falls fast each loss is ~0.9 of the recent mean: a factor of 0.85 makes
    // ordinary noise count as a spike, so some steps are skipped for sure.
    const policy = { factor: 0.85, window: 4, minHistory: 2, maxConsecutive: 100 }
    await train(dir, 1, { maxSteps: 12, metricsFile, lossSpikes: policy })
    const m = readMetrics(metricsFile)
    const d = lossSpikeDetector(policy)
    let expected = 0
    for (const x of m) {
      const spike = d.isSpike(x.loss)
      if (spike) expected++
      else d.accept(x.loss)
      expect(x.skippedLossSpikes).toBe(expected)
      // A skipped step changes nothing: its checkpoint equals the previous one.
      if (spike) expect(checkpointFiles(dir, x.step)).toEqual(checkpointFiles(dir, x.step - 1))
      else if (x.step > 1) expect(checkpointFiles(dir, x.step)).not.toEqual(checkpointFiles(dir, x.step - 1))
    }
    expect(expected).toBeGreaterThan(0)
    expect(m.at(-1)!.skippedSteps).toBe(0)
  })

  it("spikes that never end stop the run with a typed error naming the fix", async () => {
    const dir = temp("spiking")
    const error = await train(dir, 100, {
      maxSteps: 20,
      lossSpikes: { factor: 0.01, window: 4, minHistory: 2, maxConsecutive: 2 },
    }).then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(error).toMatchObject({ _tag: "TooManyLossSpikes", step: 5, consecutive: 3 })
    expect((error as Error).message).toContain("--loss-spike-factor")
  })
})
