/**
 * Soak: 500 steps of the tiny model on two CPU devices with a checkpoint every 50. Device memory
 * sampled at every step is flat after warm-up (a leak of even one small buffer per step or per
 * save would show), all memory is given back at the end, and every checkpoint restores.
 * About 45 seconds on two cores: it runs with MAGIX_SOAK=1 (as .ci/run does).
 */
import { mkdtempSync, readdirSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect } from "effect"
import { expect, it } from "vitest"
import { Devices } from "../../src/layers/Devices.ts"
import { runTraining } from "../../src/layers/Training.ts"
import { restoreStep, tinyOptions, trainingLayer } from "./training.ts"

const steps = 500
const saveEvery = 50

it.runIf(process.env.MAGIX_SOAK === "1")(
  `${steps} steps with a checkpoint every ${saveEvery}: device memory flat, every checkpoint restorable`,
  { timeout: 600_000 },
  async () => {
    const dir = mkdtempSync(join(tmpdir(), "magix-soak-"))
    const samples: Array<{ step: number; inUse: ReadonlyArray<number>; peak: ReadonlyArray<number> }> = []
    const result = await Effect.runPromise(
      Effect.gen(function* () {
        const devices = yield* Devices
        const inUse = () => [0, 1].map((d) => devices.backend.stats(d).inUse)
        const baseline = inUse()
        const r = yield* runTraining({
          ...tinyOptions,
          // The embedded data is 3 batches an epoch: enough epochs to plan past the steps.
          numEpochs: 200,
          maxSteps: steps,
          onStep: (m) =>
            Effect.sync(() => {
              samples.push({ step: m.step, inUse: m.deviceMemory.inUse, peak: m.deviceMemory.peak })
            }),
        }).pipe(Effect.scoped)
        const after = inUse()
        const restored = []
        for (const name of readdirSync(dir).sort((a, b) => Number(a) - Number(b)))
          if (/^\d+$/.test(name)) restored.push({ step: Number(name), ...(yield* restoreStep(Number(name))) })
        return { steps: r.steps, baseline, after, restored }
      }).pipe(Effect.scoped, Effect.provide(trainingLayer(dir, saveEvery))),
    )
    expect(result.steps).toBe(steps)
    expect(samples).toHaveLength(steps)
    const max = (from: number, to: number, pick: (s: (typeof samples)[number]) => ReadonlyArray<number>) =>
      [0, 1].map((d) =>
        Math.max(...samples.filter((s) => s.step > from && s.step <= to).map((s) => pick(s)[d]!)),
      )
    // Warm-up is the first 50 steps (traces, the first save); after it nothing grows.
    expect(max(100, steps, (s) => s.inUse)).toEqual(max(50, 100, (s) => s.inUse))
    expect(max(100, steps, (s) => s.peak)).toEqual(max(50, 100, (s) => s.peak))
    expect(result.after).toEqual(result.baseline)
    expect(result.restored.map((r) => r.step)).toEqual(
      Array.from({ length: steps / saveEvery }, (_, i) => (i + 1) * saveEvery),
    )
    for (const r of result.restored) expect(r).toMatchObject({ arrays: expect.any(Number), finite: true })
  },
)
