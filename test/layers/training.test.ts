/**
 * The training program: exact resume (N steps straight equal k steps, a restart from the
 * checkpoint, and N − k more: parameters, optimizer state and data position), metrics JSONL.
 */
import { mkdtempSync, readFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect } from "effect"
import { expect, it } from "vitest"
import { toHost } from "../../src/core/shardedArray.ts"
import { Checkpointer } from "../../src/layers/Checkpointer.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { runTraining } from "../../src/layers/Training.ts"
import { tinyOptions, trainingLayer } from "../hardening/training.ts"
import { countOps } from "../helpers.ts"

// The hardening tests' tiny run, for 2 epochs.
const options = { ...tinyOptions, numEpochs: 2 }

const train = (directory: string, maxSteps: number, metricsFile?: string) =>
  Effect.runPromise(
    Effect.gen(function* () {
      const r = yield* runTraining({ ...options, maxSteps, ...(metricsFile ? { metricsFile } : {}) })
      const ckpt = yield* Checkpointer
      const manifest = yield* ckpt.readManifest(r.steps)
      return {
        steps: r.steps,
        startStep: r.startStep,
        params: Object.fromEntries(
          Object.entries(r.params).map(([k, v]) => [k, Array.from(toHost(v) as Float32Array)]),
        ),
        mu: Object.fromEntries(
          Object.entries(r.optState.mu).map(([k, v]) => [k, Array.from(toHost(v) as Float32Array)]),
        ),
        scalars: Array.from(toHost(r.optState.scalars) as Float64Array),
        position: manifest.dataPosition,
      }
    }).pipe(Effect.scoped, Effect.provide(trainingLayer(directory, 2))),
  )

it("k steps, a restart from the checkpoint, then N − k steps equal N steps straight", async () => {
  const straightDir = mkdtempSync(join(tmpdir(), "magix-train-a-"))
  const resumedDir = mkdtempSync(join(tmpdir(), "magix-train-b-"))
  const metrics = join(straightDir, "metrics.jsonl")
  const straight = await train(straightDir, 6, metrics)
  const first = await train(resumedDir, 4)
  const resumed = await train(resumedDir, 6)
  expect(first.steps).toBe(4)
  expect(resumed.startStep).toBe(4)
  expect(resumed.steps).toBe(6)
  expect(resumed.params).toEqual(straight.params)
  expect(resumed.mu).toEqual(straight.mu)
  expect(resumed.scalars).toEqual(straight.scalars)
  expect(resumed.position).toEqual(straight.position)
  const lines = readFileSync(metrics, "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l))
  expect(lines.map((l) => l.step)).toEqual([1, 2, 3, 4, 5, 6])
  for (const l of lines) {
    expect(Number.isFinite(l.loss)).toBe(true)
    expect(l.deviceMemory.peak.length).toBe(2)
  }
}, 120_000)

it("deferred metric reads (as on CUDA) log the same steps, values and checkpoints as reads at once", async () => {
  const run = (deferMetrics: boolean) => {
    const dir = mkdtempSync(join(tmpdir(), `magix-train-defer-${deferMetrics}-`))
    const metrics = join(dir, "metrics.jsonl")
    // [step, optimizer updates run] at each metrics callback: a deferred step's metrics arrive
    // once the next step's update has been queued.
    const seen: Array<[number, number]> = []
    return Effect.runPromise(
      Effect.gen(function* () {
        const ops = countOps((yield* Devices).backend)
        const r = yield* runTraining({
          ...options,
          maxSteps: 6,
          metricsFile: metrics,
          deferMetrics,
          onStep: (m) => Effect.sync(() => void seen.push([m.step, ops.count("adamw")])),
        })
        const ckpt = yield* Checkpointer
        const lines = readFileSync(metrics, "utf8")
          .trim()
          .split("\n")
          .map((l) => JSON.parse(l))
        return {
          // Timing and memory differ between runs; everything else must not.
          lines: lines.map(({ step, loss, learningRate, gradNorm, tokens, skippedSteps, epoch }) => ({
            step,
            loss,
            learningRate,
            gradNorm,
            tokens,
            skippedSteps,
            epoch,
          })),
          seen,
          saved: yield* ckpt.allSteps,
          params: Object.fromEntries(
            Object.entries(r.params).map(([k, v]) => [k, Array.from(toHost(v) as Float32Array)]),
          ),
        }
      }).pipe(Effect.scoped, Effect.provide(trainingLayer(dir, 4))),
    )
  }
  const now = await run(false)
  const later = await run(true)
  expect(now.lines.map((l) => l.step)).toEqual([1, 2, 3, 4, 5, 6])
  expect(later.lines).toEqual(now.lines)
  // One adamw per device and step at once; one step ahead where the reads were deferred.
  const perStep = now.seen[0]![1]
  expect(perStep).toBeGreaterThan(0)
  expect(now.seen).toEqual([1, 2, 3, 4, 5, 6].map((n) => [n, n * perStep]))
  expect(later.seen).toEqual([1, 2, 3, 4, 5, 6].map((n) => [n, (n === 4 || n === 6 ? n : n + 1) * perStep]))
  // Saves at 4 (the interval) and 6 (the last step): those steps are read at once, the others later.
  expect(later.saved).toEqual([4, 6])
  expect(later.saved).toEqual(now.saved)
  expect(later.params).toEqual(now.params)
}, 120_000)
