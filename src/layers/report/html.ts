/**
 * The run report: one self-contained HTML page (inline CSS and SVG; no script, font, image or
 * link that would need the network) with the training curves, a summary and the run's
 * configuration. Pure: the caller decides what goes in and where the page is written, and every
 * string that did not come from this module is escaped.
 */
import { type ChartSeries, extent, lineChart } from "./chart.ts"
import {
  escapeHtml,
  formatBytes,
  formatCount,
  formatDuration,
  formatLearningRate,
  formatPercent,
  formatValue,
} from "./format.ts"

/** One logged step, as far as the report needs it (a metrics-file line, or a live step). */
export interface ReportRow {
  readonly step: number
  /** NaN where the step's loss was not finite (JSON writes it as null). */
  readonly loss: number
  readonly learningRate?: number
  readonly gradNorm?: number
  readonly tokensPerSecond?: number
  readonly mfu?: number
  /** Tokens seen since the process started. */
  readonly tokens?: number
  /** Seconds since the process started: it falls back to small values where a run resumed. */
  readonly elapsedSeconds?: number
  readonly etaSeconds?: number
  readonly skippedSteps?: number
  readonly epoch?: number
  /** The most bytes any one device held since the previous logged step. */
  readonly peakMemory?: number
}

export interface ReportSection {
  readonly title: string
  readonly entries: ReadonlyArray<readonly [string, string]>
}

export type ReportStatus = "running" | "finished" | "interrupted" | "failed" | "from metrics file"

export interface ReportPage {
  readonly title: string
  readonly status: ReportStatus
  /** Why a run failed, in the one line the CLI printed. */
  readonly statusDetail?: string
  readonly updatedAt: Date
  /** The step the run stops at, when known. */
  readonly totalSteps?: number
  readonly rows: ReadonlyArray<ReportRow>
  /** The configuration: model, flags, mesh, devices. */
  readonly sections: ReadonlyArray<ReportSection>
}

export interface RunSummary {
  readonly lastStep?: number
  readonly finalLoss?: number
  readonly lowestLoss?: readonly [step: number, loss: number]
  readonly nonFiniteLosses: number
  /** Summed over the processes of a resumed run (each one's elapsed time restarts at zero). */
  readonly trainingSeconds?: number
  readonly tokens?: number
  readonly meanTokensPerSecond?: number
  /** Over the logged steps that have one (none on a CPU: its peak is unknown). */
  readonly meanMfu?: number
  readonly skippedSteps?: number
  readonly etaSeconds?: number
  readonly peakMemory?: number
}

/** Rows by step, the later of two lines for one step kept (a resumed run repeats the steps after its checkpoint). */
export const normalizeRows = (rows: ReadonlyArray<ReportRow>): ReadonlyArray<ReportRow> => {
  const byStep = new Map<number, ReportRow>()
  for (const r of rows) byStep.set(r.step, r)
  return [...byStep.values()].sort((a, b) => a.step - b.step)
}

/** Totals over rows in the order they were written (one segment per process of a resumed run). */
export const summarize = (rows: ReadonlyArray<ReportRow>): RunSummary => {
  let trainingSeconds: number | undefined
  let tokens: number | undefined
  let segmentSeconds = 0
  let segmentTokens = 0
  const close = () => {
    trainingSeconds = (trainingSeconds ?? 0) + segmentSeconds
    tokens = (tokens ?? 0) + segmentTokens
  }
  let previous: ReportRow | undefined
  for (const r of rows) {
    if (r.elapsedSeconds === undefined) continue
    if (previous?.elapsedSeconds !== undefined && r.elapsedSeconds < previous.elapsedSeconds) {
      close()
      segmentSeconds = 0
      segmentTokens = 0
    }
    segmentSeconds = r.elapsedSeconds
    segmentTokens = r.tokens ?? 0
    previous = r
  }
  if (previous) close()
  const sorted = normalizeRows(rows)
  const finite = sorted.filter((r) => Number.isFinite(r.loss))
  const lowest = finite.reduce<ReportRow | undefined>(
    (m, r) => (m === undefined || r.loss < m.loss ? r : m),
    undefined,
  )
  const last = sorted.at(-1)
  const peaks = sorted.flatMap((r) => (r.peakMemory !== undefined ? [r.peakMemory] : []))
  const mfus = sorted.flatMap((r) => (r.mfu !== undefined && Number.isFinite(r.mfu) ? [r.mfu] : []))
  return {
    ...(last ? { lastStep: last.step } : {}),
    ...(finite.length ? { finalLoss: finite.at(-1)!.loss } : {}),
    ...(lowest ? { lowestLoss: [lowest.step, lowest.loss] as const } : {}),
    nonFiniteLosses: sorted.length - finite.length,
    ...(trainingSeconds !== undefined ? { trainingSeconds } : {}),
    ...(tokens !== undefined && tokens > 0 ? { tokens } : {}),
    ...(tokens && trainingSeconds ? { meanTokensPerSecond: tokens / trainingSeconds } : {}),
    ...(mfus.length ? { meanMfu: mfus.reduce((a, b) => a + b, 0) / mfus.length } : {}),
    ...(last?.skippedSteps !== undefined ? { skippedSteps: last.skippedSteps } : {}),
    ...(last?.etaSeconds !== undefined ? { etaSeconds: last.etaSeconds } : {}),
    ...(peaks.length ? { peakMemory: extent(peaks)[1] } : {}),
  }
}

/** An exponential moving average, to see the trend through the noise of small batches. */
const smooth = (points: ReadonlyArray<readonly [number, number]>): Array<readonly [number, number]> => {
  const span = Math.max(2, Math.round(points.length / 25))
  const alpha = 2 / (span + 1)
  let avg: number | undefined
  return points.map(([s, v]) => {
    if (Number.isFinite(v)) avg = avg === undefined ? v : avg + alpha * (v - avg)
    return [s, avg ?? Number.NaN] as const
  })
}

const seriesOf = (rows: ReadonlyArray<ReportRow>, pick: (r: ReportRow) => number | undefined) =>
  rows.flatMap((r) => {
    const v = pick(r)
    return v === undefined ? [] : [[r.step, v] as const]
  })

const charts = (rows: ReadonlyArray<ReportRow>): string[] => {
  const loss = seriesOf(rows, (r) => r.loss)
  const lossSeries: ChartSeries[] = [{ name: "loss", points: loss, className: "s-loss" }]
  if (loss.length >= 20)
    lossSeries.push({ name: "moving average", points: smooth(loss), className: "s-trend" })
  const out = [lineChart(lossSeries, { title: "Loss" })]
  const optional: Array<[string, string, (r: ReportRow) => number | undefined, (v: number) => string]> = [
    ["Learning rate", "s-lr", (r) => r.learningRate, formatLearningRate],
    ["Tokens per second", "s-tps", (r) => r.tokensPerSecond, formatCount],
    ["Gradient norm (before clipping)", "s-grad", (r) => r.gradNorm, formatValue],
    ["Model FLOPs utilisation", "s-mfu", (r) => r.mfu, formatPercent],
  ]
  // Memory in one binary unit, so that the axis ticks land on round numbers of it.
  const memoryMax = extent(rows.map((r) => r.peakMemory ?? 0))[1]
  const [unit, scale] = memoryMax >= 2 ** 30 ? ["GiB", 2 ** 30] : ["MiB", 2 ** 20]
  optional.push([
    `Peak device memory (${unit})`,
    "s-mem",
    (r) => (r.peakMemory === undefined ? undefined : r.peakMemory / scale),
    (v) => `${formatValue(v)} ${unit}`,
  ])
  for (const [title, className, pick, format] of optional) {
    const points = seriesOf(rows, pick)
    // The learning rate is always drawn (an empty chart says it is missing); the rest only when logged.
    if (points.length > 0 || className === "s-lr")
      out.push(lineChart([{ name: title, points, className }], { title, format }))
  }
  return out
}

/** Evenly spaced rows, the first and the last always among them. */
export const sampleRows = (rows: ReadonlyArray<ReportRow>, max: number): ReadonlyArray<ReportRow> => {
  if (rows.length <= max) return rows
  const out: ReportRow[] = []
  for (let i = 0; i < max; i++) out.push(rows[Math.round((i * (rows.length - 1)) / (max - 1))]!)
  return out
}

/** The logged values as numbers a person can read and copy (the curves are only shapes). */
const stepsTable = (rows: ReadonlyArray<ReportRow>, max = 200): string => {
  if (rows.length === 0) return ""
  const shown = sampleRows(rows, max)
  const columns: Array<readonly [string, (r: ReportRow) => number | undefined, (v: number) => string]> = [
    ["loss", (r) => r.loss, formatValue],
    ["learning rate", (r) => r.learningRate, formatLearningRate],
    ["grad norm", (r) => r.gradNorm, formatValue],
    ["tokens/s", (r) => r.tokensPerSecond, formatCount],
    ["MFU", (r) => r.mfu, formatPercent],
  ]
  const used = columns.filter(([, pick]) => rows.some((r) => pick(r) !== undefined))
  const head = `<tr><th>step</th>${used.map(([name]) => `<th>${name}</th>`).join("")}</tr>`
  const body = shown
    .map((r) => {
      const cells = used.map(([, pick, format]) => {
        const v = pick(r)
        return `<td>${v === undefined ? "" : escapeHtml(format(v))}</td>`
      })
      return `<tr><td>${r.step}</td>${cells.join("")}</tr>`
    })
    .join("\n")
  const note = shown.length < rows.length ? `, ${shown.length} of them shown evenly spaced` : ""
  return (
    `<details class="steps"><summary>Logged steps (${rows.length}${note})</summary>\n` +
    `<table class="steps">\n${head}\n${body}\n</table></details>`
  )
}

const summaryCards = (page: ReportPage, s: RunSummary): Array<readonly [string, string]> => {
  const cards: Array<readonly [string, string]> = [
    [
      "steps",
      s.lastStep === undefined
        ? "none yet"
        : page.totalSteps !== undefined
          ? `${s.lastStep} / ${page.totalSteps}`
          : String(s.lastStep),
    ],
    ["final loss", s.finalLoss !== undefined ? formatValue(s.finalLoss) : "—"],
    s.lowestLoss ? [`lowest (step ${s.lowestLoss[0]})`, formatValue(s.lowestLoss[1])] : ["lowest loss", "—"],
    ["training time", formatDuration(s.trainingSeconds)],
  ]
  if (s.meanTokensPerSecond !== undefined) cards.push(["mean tokens/s", formatCount(s.meanTokensPerSecond)])
  if (s.tokens !== undefined) cards.push(["tokens", formatCount(s.tokens)])
  if (s.meanMfu !== undefined) cards.push(["mean MFU", formatPercent(s.meanMfu)])
  if (page.status === "running" && s.etaSeconds !== undefined)
    cards.push(["ETA", formatDuration(s.etaSeconds)])
  if (s.skippedSteps !== undefined) cards.push(["skipped steps", String(s.skippedSteps)])
  if (s.nonFiniteLosses > 0) cards.push(["non-finite losses", String(s.nonFiniteLosses)])
  if (s.peakMemory !== undefined) cards.push(["peak device memory", formatBytes(s.peakMemory)])
  return cards
}

const style = `
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #ffffff; --card: #f6f8fa;
  --loss: #0969da; --trend: #cf222e; --lr: #8250df; --tps: #1a7f37; --grad: #bc4c00; --mfu: #0550ae; --mem: #6e7781; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1360px; padding: 24px 28px 40px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; font-weight: 600; }
h2 { font-size: 16px; margin: 28px 0 10px; font-weight: 600; }
h3 { font-size: 13px; margin: 0 0 6px; color: var(--muted); font-weight: 600; text-transform: uppercase; letter-spacing: .04em; }
.meta { color: var(--muted); margin: 0 0 18px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #fff; margin-left: 6px; vertical-align: 2px; }
.status-running { background: #0969da; } .status-finished { background: #1a7f37; }
.status-interrupted { background: #9a6700; } .status-failed { background: #cf222e; } .status-from-metrics-file { background: #6e7781; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
.card .k { color: var(--muted); font-size: 12px; } .card .v { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 14px; }
.chart { width: 100%; height: auto; background: var(--bg); border: 1px solid var(--line); border-radius: 6px; }
.chart text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; fill: var(--muted); }
.chart .chart-title { font-size: 14px; font-weight: 600; fill: var(--fg); }
.chart .chart-headline { font-variant-numeric: tabular-nums; fill: var(--fg); }
.chart .frame { fill: none; stroke: var(--line); } .chart .grid { stroke: var(--line); stroke-dasharray: 2 3; }
.chart .series { fill: none; stroke-width: 1.6; stroke-linejoin: round; stroke-linecap: round; }
.chart .gap { stroke: #cf222e; stroke-width: 1.5; }
.s-loss { stroke: var(--loss); } .s-trend { stroke: var(--trend); stroke-width: 2 !important; }
.s-lr { stroke: var(--lr); } .s-tps { stroke: var(--tps); } .s-grad { stroke: var(--grad); } .s-mfu { stroke: var(--mfu); } .s-mem { stroke: var(--mem); }
.s-loss-dot { fill: var(--loss); } .s-trend-dot { fill: var(--trend); } .s-lr-dot { fill: var(--lr); } .s-tps-dot { fill: var(--tps); }
.s-grad-dot { fill: var(--grad); } .s-mfu-dot { fill: var(--mfu); } .s-mem-dot { fill: var(--mem); }
.chart .s-loss-text { fill: var(--loss); } .chart .s-trend-text { fill: var(--trend); }
.config { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 14px; align-items: start; }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line); border-radius: 6px; }
td { padding: 4px 10px; border-top: 1px solid var(--line); vertical-align: top; }
tr:first-child td { border-top: none; }
td.k { color: var(--muted); white-space: nowrap; width: 40%; } td.v { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; word-break: break-all; }
details.steps { margin-top: 14px; } details.steps summary { cursor: pointer; color: var(--muted); }
table.steps { margin-top: 8px; font-variant-numeric: tabular-nums; font-size: 12.5px; }
table.steps th { text-align: right; padding: 4px 10px; color: var(--muted); font-weight: 600; }
table.steps td { text-align: right; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
footer { margin-top: 28px; color: var(--muted); font-size: 12px; }
`

/** The whole page as one string. */
export const renderReport = (page: ReportPage): string => {
  const rows = normalizeRows(page.rows)
  const summary = summarize(page.rows)
  const e = escapeHtml
  const cards = summaryCards(page, summary)
    .map(([k, v]) => `<div class="card"><div class="k">${e(k)}</div><div class="v">${e(v)}</div></div>`)
    .join("\n")
  const sections = page.sections
    .map(
      (s) =>
        `<section><h3>${e(s.title)}</h3><table>` +
        s.entries.map(([k, v]) => `<tr><td class="k">${e(k)}</td><td class="v">${e(v)}</td></tr>`).join("") +
        "</table></section>",
    )
    .join("\n")
  const statusClass = `status-${page.status.replace(/ /g, "-")}`
  const updated = page.updatedAt
    .toISOString()
    .replace("T", " ")
    .replace(/\.\d+Z$/, " UTC")
  const detail = page.statusDetail ? ` — ${e(page.statusDetail)}` : ""
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="magix">
<title>${e(page.title)}</title>
<style>${style}</style>
</head>
<body>
<h1>${e(page.title)}<span class="status ${statusClass}">${e(page.status)}</span></h1>
<p class="meta">updated ${e(updated)}${detail}</p>
<div class="cards">
${cards}
</div>
<h2>Curves</h2>
<div class="charts">
${charts(rows).join("\n")}
</div>
${stepsTable(rows)}
<h2>Configuration</h2>
<div class="config">
${sections}
</div>
<footer>Written by magix. Environment variables are never included.</footer>
</body>
</html>
`
}
