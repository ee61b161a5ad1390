/**
 * The `--report` page of a training run, kept current while it runs: written once before the
 * first step (so a path that cannot be written fails the command at once, not after hours), then
 * refreshed whenever a step crosses a checkpoint interval and at least every `everySeconds`, and
 * finally when the run ends, however it ends. A run killed outright still leaves a page as recent
 * as its last checkpoint; one interrupted (Ctrl-C) or failed says so on the page.
 *
 * A refresh that cannot be written mid-run is a warning, not a failure: losing the page is better
 * than losing the training run. Only flags, the model config and the devices go on the page —
 * never environment variables, where tokens (HF_TOKEN) live.
 */
import { readFileSync } from "node:fs"
import { Cause, Effect, Exit, Option } from "effect"
import type { Mesh } from "../../core/mesh.ts"
import type { CausalLM } from "../../core/models/decoder.ts"
import { totalPeakFlops } from "../../core/peakFlops.ts"
import type { DeviceInfo } from "../Devices.ts"
import type { StepMetrics } from "../Training.ts"
import { readMetricsFile, rowFromMetrics, writeReport } from "./files.ts"
import { formatBytes, formatCount } from "./format.ts"
import {
  type ReportPage,
  type ReportRow,
  type ReportSection,
  type ReportStatus,
  renderReport,
} from "./html.ts"

export interface LiveReportOptions {
  readonly path: string
  readonly title: string
  /** The command's flags as given (see `describeFlags`). */
  readonly flags: ReadonlyArray<readonly [string, string]>
  /** Refresh when a step crosses a multiple of this: the checkpoint interval. */
  readonly everySteps: number
  /** Refresh at least this often while steps come in (default 60). */
  readonly everySeconds?: number
  /** Where earlier steps of a resumed run are found, so its page shows the whole curve. */
  readonly metricsFile?: string
  /** How a failed refresh is reported (default: a line on stderr). */
  readonly warn?: (text: string) => Effect.Effect<void>
  /** Milliseconds, for the refresh interval (tests pass their own clock). */
  readonly now?: () => number
}

/** What `runTraining` tells its `onStart` hook, and the devices it runs on. */
export interface RunDescription {
  readonly model: CausalLM
  readonly mesh: Mesh
  readonly totalSteps: number
  readonly startStep: number
  readonly parameters: number
  readonly platform: string
  readonly devices: ReadonlyArray<DeviceInfo>
}

export interface LiveReport {
  readonly started: (run: RunDescription) => Effect.Effect<void>
  readonly step: (m: StepMetrics) => Effect.Effect<void>
  /** The last page, with the run's outcome; never fails (the run's own outcome matters more). */
  readonly finish: (exit: Exit.Exit<unknown, unknown>) => Effect.Effect<void>
}

const kebab = (s: string) => s.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)

/** Parsed CLI flags as `--flag value` rows; an absent optional flag reads "(default)". */
export const describeFlags = (flags: Readonly<Record<string, unknown>>): Array<readonly [string, string]> =>
  Object.entries(flags).flatMap(([k, v]) => {
    if (typeof v === "function") return []
    const shown = Option.isOption(v)
      ? Option.match(v, { onNone: () => "(default)", onSome: (x) => String(x) })
      : Array.isArray(v)
        ? v.join(" ")
        : String(v)
    return [[`--${kebab(k)}`, shown] as const]
  })

const magixVersion = (() => {
  try {
    const pkg = JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8"))
    return String((pkg as { version?: unknown }).version ?? "?")
  } catch {
    return "?"
  }
})()

/** The configuration sections of the page: model, mesh and devices. */
export const describeRun = (run: RunDescription): ReadonlyArray<ReportSection> => {
  const c = run.model.config
  const model: Array<readonly [string, string]> = [
    ["family", c.modelType],
    ["parameters", `${formatCount(run.parameters)} (${run.parameters.toLocaleString("en-US")})`],
    ["layers", String(c.numHiddenLayers)],
    ["hidden size", String(c.hiddenSize)],
    ["intermediate size", String(c.intermediateSize)],
    ["attention heads", `${c.numAttentionHeads} (${c.numKeyValueHeads} key/value), head size ${c.headDim}`],
    ["vocabulary", String(c.vocabSize)],
    ["compute dtype", run.model.computeDtype],
  ]
  if (c.slidingWindow !== null) model.push(["sliding window", String(c.slidingWindow)])
  const names = new Map<string, number>()
  for (const d of run.mesh.devices) {
    const name = run.devices[d]?.name ?? `device ${d}`
    names.set(name, (names.get(name) ?? 0) + 1)
  }
  const memory = run.devices.find((d) => d.memory > 0)?.memory
  const meshNames = run.mesh.devices.map((d) => run.devices[d]?.name ?? `device ${d}`)
  const peak = totalPeakFlops(meshNames)
  // Said outright, so that a page without an MFU curve does not read as a forgotten one.
  const peakText =
    peak !== undefined
      ? `${formatCount(peak / 1e12)} TFLOP/s over the mesh (MFU is measured against it)`
      : `unknown for ${meshNames[0] ?? "these devices"}: MFU not shown`
  return [
    { title: "Model", entries: model },
    {
      title: "Mesh and devices",
      entries: [
        ["mesh", run.mesh.axisNames.map((n, i) => `${n}=${run.mesh.shape[i]}`).join(" × ")],
        ["platform", run.platform],
        ["devices", [...names].map(([n, k]) => `${k} × ${n}`).join(", ")],
        ...(memory !== undefined ? [["memory per device", formatBytes(memory)] as const] : []),
        ["peak bf16 FLOP/s", peakText],
      ],
    },
    {
      title: "Run",
      entries: [
        ["steps planned", String(run.totalSteps)],
        ["resumed after step", run.startStep > 0 ? String(run.startStep) : "— (fresh start)"],
        ["magix", magixVersion],
        ["node", process.version],
      ],
    },
  ]
}

const failureText = (cause: Cause.Cause<unknown>): string => {
  const e = Cause.findErrorOption(cause)
  const x = Option.isSome(e) ? e.value : Cause.squash(cause)
  const text =
    typeof x === "object" && x !== null && "message" in x
      ? String((x as { message: unknown }).message)
      : String(x)
  return text.split("\n")[0]!
}

export const makeLiveReport = (o: LiveReportOptions) =>
  Effect.gen(function* () {
    const now = o.now ?? (() => performance.now())
    const everyMs = (o.everySeconds ?? 60) * 1000
    const everySteps = Math.max(1, o.everySteps)
    const warn =
      o.warn ??
      ((text: string) =>
        Effect.sync(() => {
          process.stderr.write(`${text}\n`)
        }))
    let rows: ReportRow[] = []
    let sections: ReadonlyArray<ReportSection> = [{ title: "Flags", entries: o.flags }]
    let totalSteps: number | undefined
    let lastWriteMs = now()
    let lastWrittenStep = 0
    let warned = false
    const page = (status: ReportStatus, statusDetail?: string): ReportPage => ({
      title: o.title,
      status,
      ...(statusDetail ? { statusDetail } : {}),
      updatedAt: new Date(),
      ...(totalSteps !== undefined ? { totalSteps } : {}),
      rows,
      sections,
    })
    const write = (status: ReportStatus, statusDetail?: string) =>
      writeReport(o.path, renderReport(page(status, statusDetail))).pipe(
        Effect.tap(() =>
          Effect.sync(() => {
            lastWriteMs = now()
            lastWrittenStep = rows.at(-1)?.step ?? lastWrittenStep
          }),
        ),
      )
    // Warn once: a disk that is full stays full, and one line per refresh would bury the progress.
    const refresh = (status: ReportStatus, statusDetail?: string) =>
      write(status, statusDetail).pipe(
        Effect.catch((e) =>
          warned
            ? Effect.void
            : Effect.andThen(
                Effect.sync(() => {
                  warned = true
                }),
                warn(`magix: warning: ${e.message}; training goes on`),
              ),
        ),
      )
    yield* write("running")
    const report: LiveReport = {
      started: (run) =>
        Effect.gen(function* () {
          totalSteps = run.totalSteps
          sections = [...describeRun(run), { title: "Flags", entries: o.flags }]
          if (run.startStep > 0 && o.metricsFile) {
            const earlier = yield* readMetricsFile(o.metricsFile).pipe(
              Effect.orElseSucceed((): ReadonlyArray<ReportRow> => []),
            )
            rows = earlier.filter((r) => r.step <= run.startStep)
          }
          lastWrittenStep = run.startStep
          yield* refresh("running")
        }),
      step: (m) =>
        Effect.suspend(() => {
          rows.push(rowFromMetrics(m))
          const crossed = Math.floor(m.step / everySteps) > Math.floor(lastWrittenStep / everySteps)
          return crossed || now() - lastWriteMs >= everyMs ? refresh("running") : Effect.void
        }),
      finish: (exit) =>
        Exit.isSuccess(exit)
          ? refresh("finished")
          : Cause.hasInterruptsOnly(exit.cause)
            ? refresh("interrupted")
            : refresh("failed", failureText(exit.cause)),
    }
    return report
  })
