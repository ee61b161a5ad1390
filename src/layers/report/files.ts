/**
 * The report's files: reading a `--metrics-file` (JSONL, one object per logged step) back into
 * report rows, and writing the page so that a reader never sees half of it (written beside the
 * target, then renamed over it: the page is refreshed while a browser may have it open).
 */
import { readFile, rename, rm, writeFile } from "node:fs/promises"
import { dirname, resolve } from "node:path"
import { Cause, Effect, Exit, Schema } from "effect"
import { makeDirectories } from "../makeDirectories.ts"
import type { StepMetrics } from "../Training.ts"
import type { ReportRow } from "./html.ts"

export class ReportWriteFailed extends Schema.TaggedError<ReportWriteFailed>()("ReportWriteFailed", {
  path: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `cannot write the report to ${this.path} (${this.detail}): choose a writable path for --report`
  }
}

export class MetricsFileNotFound extends Schema.TaggedError<MetricsFileNotFound>()("MetricsFileNotFound", {
  path: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `cannot read the metrics file ${this.path} (${this.detail}): pass the --metrics-file a \`magix train\` run wrote`
  }
}

export class MetricsLineInvalid extends Schema.TaggedError<MetricsLineInvalid>()("MetricsLineInvalid", {
  path: Schema.String,
  /** 1-based. */
  line: Schema.Number,
  detail: Schema.String,
}) {
  override get message() {
    return (
      `${this.path}, line ${this.line}: not a metrics line (${this.detail}). ` +
      'Each line must be a JSON object with at least "step" and "loss", as `magix train --metrics-file` writes'
    )
  }
}

export class MetricsFileEmpty extends Schema.TaggedError<MetricsFileEmpty>()("MetricsFileEmpty", {
  path: Schema.String,
}) {
  override get message() {
    return `${this.path} holds no logged step yet: a run writes its first line at step --log-every`
  }
}

// JSON has no NaN: a non-finite loss is written as null.
const value = Schema.optionalKey(Schema.NullOr(Schema.Number))
const MetricsLine = Schema.Struct({
  step: Schema.Number,
  loss: Schema.NullOr(Schema.Number),
  learningRate: value,
  gradNorm: value,
  tokensPerSecond: value,
  mfu: value,
  tokens: value,
  elapsedSeconds: value,
  etaSeconds: value,
  skippedSteps: value,
  epoch: value,
  deviceMemory: Schema.optionalKey(Schema.Struct({ peak: Schema.Array(Schema.Number) })),
})

type Line = typeof MetricsLine.Type

const defined = <K extends string>(key: K, v: number | null | undefined): { [P in K]?: number } =>
  (v === undefined || v === null ? {} : { [key]: v }) as { [P in K]?: number }

const rowOf = (l: Line): ReportRow => ({
  step: l.step,
  loss: l.loss ?? Number.NaN,
  ...defined("learningRate", l.learningRate),
  ...defined("gradNorm", l.gradNorm),
  ...defined("tokensPerSecond", l.tokensPerSecond),
  ...defined("mfu", l.mfu),
  ...defined("tokens", l.tokens),
  ...defined("elapsedSeconds", l.elapsedSeconds),
  ...defined("etaSeconds", l.etaSeconds),
  ...defined("skippedSteps", l.skippedSteps),
  ...defined("epoch", l.epoch),
  ...(l.deviceMemory && l.deviceMemory.peak.length > 0
    ? { peakMemory: Math.max(...l.deviceMemory.peak) }
    : {}),
})

/** A live step as a report row (the same fields the metrics file holds). */
export const rowFromMetrics = (m: StepMetrics): ReportRow =>
  rowOf({
    ...m,
    ...(m.mfu !== undefined ? { mfu: m.mfu } : {}),
    ...(m.etaSeconds !== undefined ? { etaSeconds: m.etaSeconds } : {}),
  })

const issueText = (cause: Cause.Cause<unknown>): string => {
  const e = Cause.squash(cause)
  // "Expected number\n  at ["step"]" reads better on one line.
  return (e instanceof Error ? e.message : String(e)).replace(/\s*\n\s*at /, " at ")
}

/**
 * The rows of a metrics file in the order written. A last line cut short without its newline (the
 * remainder of a killed run's write, so not even JSON) is left out; any other bad line is an error
 * naming the file and the line.
 */
export const readMetricsFile = (path: string) =>
  Effect.gen(function* () {
    const text = yield* Effect.tryPromise({
      try: () => readFile(path, "utf8"),
      catch: (e) => new MetricsFileNotFound({ path, detail: (e as NodeJS.ErrnoException).code ?? String(e) }),
    })
    const lines = text.split("\n")
    const rows: ReportRow[] = []
    const decode = Schema.decodeUnknownExit(MetricsLine)
    for (let i = 0; i < lines.length; i++) {
      const raw = lines[i]!.trim()
      if (raw === "") continue
      let json: unknown
      try {
        json = JSON.parse(raw)
      } catch (e) {
        if (i === lines.length - 1) break
        return yield* new MetricsLineInvalid({ path, line: i + 1, detail: (e as Error).message })
      }
      const decoded = decode(json)
      if (Exit.isFailure(decoded))
        return yield* new MetricsLineInvalid({ path, line: i + 1, detail: issueText(decoded.cause) })
      rows.push(rowOf(decoded.value))
    }
    return rows as ReadonlyArray<ReportRow>
  })

let writes = 0

/**
 * Writes the page atomically: beside the target, then renamed over it. Uninterruptible (a page is
 * written in milliseconds): an interrupted write would go on unobserved and could rename its
 * "running" page over the "interrupted" one written after it.
 */
export const writeReport = (path: string, html: string) => {
  const target = resolve(path)
  const tmp = `${target}.tmp-${process.pid}-${writes++}`
  return Effect.tryPromise({
    try: async () => {
      await makeDirectories(dirname(target))
      try {
        await writeFile(tmp, html)
        await rename(tmp, target)
      } catch (e) {
        await rm(tmp, { force: true })
        throw e
      }
    },
    catch: (e) => new ReportWriteFailed({ path, detail: (e as NodeJS.ErrnoException).code ?? String(e) }),
  }).pipe(Effect.uninterruptible)
}
