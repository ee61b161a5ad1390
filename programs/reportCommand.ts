/**
 * `magix report`: the `--report` page of a run, built after the fact from the JSONL its
 * `--metrics-file` holds (a run started without --report, a run on another machine, or a run that
 * was killed before its page was refreshed). The file has no configuration, so the page shows
 * the curves and the summary only.
 */
import { basename, resolve } from "node:path"
import { Effect, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { MetricsFileEmpty, readMetricsFile, writeReport } from "../src/layers/report/files.ts"
import { renderReport } from "../src/layers/report/html.ts"
import { reportFailures } from "./report.ts"

const flags = {
  metricsFile: Flag.String("metrics-file").pipe(
    Flag.withDescription("the JSONL a `magix train --metrics-file` run wrote"),
  ),
  output: Flag.String("output").pipe(
    Flag.optional,
    Flag.withDescription("the HTML page to write (default: the metrics file with .html)"),
  ),
  title: Flag.String("title").pipe(Flag.optional, Flag.withDescription("the page's title")),
}

type ReportFlags = {
  readonly [K in keyof typeof flags]: (typeof flags)[K] extends Flag.Flag<infer A> ? A : never
}

export const reportProgram = (f: ReportFlags) =>
  Effect.gen(function* () {
    const output = Option.getOrElse(f.output, () => f.metricsFile.replace(/(\.jsonl?)?$/, ".html"))
    const rows = yield* readMetricsFile(f.metricsFile)
    if (rows.length === 0) return yield* new MetricsFileEmpty({ path: f.metricsFile })
    yield* writeReport(
      output,
      renderReport({
        title: Option.getOrElse(f.title, () => `magix train: ${basename(f.metricsFile)}`),
        status: "from metrics file",
        updatedAt: new Date(),
        rows,
        sections: [
          {
            title: "Source",
            entries: [
              ["metrics file", resolve(f.metricsFile)],
              ["lines", String(rows.length)],
            ],
          },
        ],
      }),
    )
    process.stderr.write(`magix: report of ${rows.length} logged steps written to ${resolve(output)}\n`)
    return resolve(output)
  })

export const reportCommand = Command.make("report", flags, (f) => reportFailures(reportProgram(f))).pipe(
  Command.withDescription(
    "write the HTML report (loss and learning-rate curves, summary) of a --metrics-file",
  ),
)
