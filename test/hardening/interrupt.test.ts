/**
 * Interruption: `magix train` in a child process, stopped by SIGINT or SIGTERM (between steps and
 * while a checkpoint is being written), exits within seconds with 130 or 143 and one line, leaves
 * only complete, restorable checkpoints, and a rerun resumes from the latest. In-process, an
 * interrupted training fiber gives all device memory back.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { existsSync, mkdtempSync, readdirSync, readFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Deferred, Effect, Fiber } from "effect"
import { describe, expect, it } from "vitest"
import { Devices } from "../../src/layers/Devices.ts"
import { runTraining } from "../../src/layers/Training.ts"
import { restoreStep, tinyOptions, trainingLayer } from "./training.ts"

const root = join(import.meta.dirname, "..", "..")

interface Run {
  readonly child: ChildProcess
  readonly dir: string
  readonly checkpoints: string
  readonly metrics: string
  stderr: string
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; at: number }>
}

const startTraining = (dir: string, maxSteps: number): Run => {
  const checkpoints = join(dir, "ck")
  const metrics = join(dir, "metrics.jsonl")
  const child = spawn(
    process.execPath,
    [
      join(root, "bin", "magix.js"),
      "train",
      "--cpu-devices",
      "2",
      "--mesh-shape",
      "2",
      "1",
      "--checkpoint-dir",
      checkpoints,
      "--save-steps",
      "4",
      "--metrics-file",
      metrics,
      "--max-steps",
      String(maxSteps),
    ],
    { cwd: dir, stdio: ["ignore", "ignore", "pipe"] },
  )
  const run: Run = {
    child,
    dir,
    checkpoints,
    metrics,
    stderr: "",
    exited: new Promise((resolve) =>
      child.on("exit", (code, signal) => resolve({ code, signal, at: performance.now() })),
    ),
  }
  child.stderr!.on("data", (d: Buffer) => {
    run.stderr += d.toString()
  })
  return run
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** Polls until `ready` holds (or the child ended, or a minute passed). */
const until = async (run: Run, ready: () => boolean, everyMs = 20) => {
  let ended = false
  void run.exited.then(() => {
    ended = true
  })
  const deadline = performance.now() + 60_000
  while (!ready()) {
    if (ended || performance.now() > deadline) throw new Error(`never ready; stderr:\n${run.stderr}`)
    await sleep(everyMs)
  }
}

const stepsLogged = (run: Run) =>
  existsSync(run.metrics) ? readFileSync(run.metrics, "utf8").split("\n").filter(Boolean).length : 0

const entries = (run: Run) => (existsSync(run.checkpoints) ? readdirSync(run.checkpoints) : [])

/** Signals the child and checks how it ended; returns the complete checkpoint steps it left. */
const interruptAndCheck = async (run: Run, signal: "SIGINT" | "SIGTERM") => {
  const sent = performance.now()
  run.child.kill(signal)
  const { code, at } = await run.exited
  expect((at - sent) / 1000).toBeLessThan(5)
  expect(code).toBe(signal === "SIGINT" ? 130 : 143)
  const lines = run.stderr.trim().split("\n")
  expect(lines.at(-1)).toMatch(new RegExp(`^magix: interrupted by ${signal}; run the same command to resume`))
  expect(lines.filter((l) => l.includes("interrupted"))).toHaveLength(1)
  expect(run.stderr).not.toContain("    at ")
  // Only complete checkpoints: no temporary directory (a save in flight was finished), each restorable.
  const names = entries(run)
  expect(names.filter((n) => !/^\d+$/.test(n))).toEqual([])
  const steps = names.map(Number).sort((a, b) => a - b)
  expect(steps.length).toBeGreaterThan(0)
  for (const step of steps) {
    const r = await Effect.runPromise(
      restoreStep(step).pipe(Effect.scoped, Effect.provide(trainingLayer(run.checkpoints, 4))),
    )
    expect(r.finite).toBe(true)
  }
  return steps
}

/** A rerun of the same command resumes after the latest checkpoint and finishes. */
const resumes = async (run: Run, latest: number) => {
  const again = startTraining(run.dir, latest + 2)
  const { code } = await again.exited
  expect(code).toBe(0)
  expect(again.stderr).toContain(`resuming after step ${latest} from ${run.checkpoints}`)
  expect(again.stderr).toContain(`magix: ${latest + 2} steps`)
}

describe("magix train, interrupted", () => {
  it("SIGINT between steps: exit 130, one line, complete checkpoints, resumable", async () => {
    const run = startTraining(mkdtempSync(join(tmpdir(), "magix-sigint-")), 400)
    await until(run, () => stepsLogged(run) >= 10)
    const steps = await interruptAndCheck(run, "SIGINT")
    await resumes(run, steps.at(-1)!)
  })

  it("SIGTERM: exit 143", async () => {
    const run = startTraining(mkdtempSync(join(tmpdir(), "magix-sigterm-")), 400)
    await until(run, () => stepsLogged(run) >= 6)
    await interruptAndCheck(run, "SIGTERM")
  })

  it("SIGINT while a checkpoint is being written: the save completes, nothing temporary is left", async () => {
    const run = startTraining(mkdtempSync(join(tmpdir(), "magix-sigsave-")), 400)
    // Past the first save, catch the second one in the act.
    await until(run, () => stepsLogged(run) >= 5)
    let writing: string | undefined
    await until(
      run,
      () => {
        writing = entries(run).find((n) => /^\d+\.tmp-[0-9a-f]+$/.test(n))
        return writing !== undefined
      },
      2,
    )
    const step = Number(writing!.split(".")[0])
    const steps = await interruptAndCheck(run, "SIGINT")
    expect(steps).toContain(step)
    await resumes(run, steps.at(-1)!)
  })
})

describe("runTraining, interrupted in-process", () => {
  it("gives every device byte back", async () => {
    const dir = mkdtempSync(join(tmpdir(), "magix-interrupt-memory-"))
    const result = await Effect.runPromise(
      Effect.gen(function* () {
        const devices = yield* Devices
        const inUse = () => [0, 1].map((d) => devices.backend.stats(d).inUse)
        const baseline = inUse()
        const sixSteps = yield* Deferred.make<ReadonlyArray<number>>()
        const fiber = yield* Effect.forkChild(
          runTraining({
            ...tinyOptions,
            maxSteps: 1000,
            onStep: (m) =>
              m.step === 6
                ? Deferred.succeed(sixSteps, m.deviceMemory.inUse).pipe(Effect.asVoid)
                : Effect.void,
          }).pipe(Effect.scoped),
        )
        const during = yield* Deferred.await(sixSteps)
        yield* Fiber.interrupt(fiber)
        return { baseline, during, after: inUse() }
      }).pipe(Effect.scoped, Effect.provide(trainingLayer(dir, 4))),
    )
    expect(result.during.every((b, i) => b > result.baseline[i]!)).toBe(true)
    expect(result.after).toEqual(result.baseline)
  })
})
