/**
 * Line charts over training steps as inline SVG, drawn here so that a report is one file with no
 * script, font or network access: it opens the same from a laptop, a CI artifact or a mail.
 *
 * Every finite point of a series is one vertex of its path (a non-finite value, a skipped step,
 * breaks the line and is marked under the axis), up to `maxPoints`; longer series keep the lowest
 * and highest value of each bucket of steps, so a loss spike never disappears by decimation.
 */
import { escapeHtml, formatValue } from "./format.ts"

export interface ChartSeries {
  readonly name: string
  /** [step, value] in step order. */
  readonly points: ReadonlyArray<readonly [number, number]>
  /** CSS class giving its stroke (see the report's style sheet). */
  readonly className: string
}

export interface ChartOptions {
  readonly title: string
  /** Tick and headline labels. */
  readonly format?: (v: number) => string
  readonly width?: number
  readonly height?: number
  readonly maxPoints?: number
}

const margin = { left: 64, right: 16, top: 34, bottom: 30 }

/** Round numbers for axis ticks: 1, 2 or 5 times a power of ten, about `count` of them. */
export const niceTicks = (lo: number, hi: number, count = 5): number[] => {
  if (!(hi > lo)) return [lo]
  const raw = (hi - lo) / count
  const magnitude = 10 ** Math.floor(Math.log10(raw))
  const f = raw / magnitude
  const step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * magnitude
  const out: number[] = []
  for (let i = Math.ceil(lo / step - 1e-9); i * step <= hi + step * 1e-9; i++)
    out.push(Number((i * step).toPrecision(12)))
  return out
}

/** Smallest and largest, by a loop: spreading a long run's values into Math.min overflows the stack. */
export const extent = (values: ReadonlyArray<number>): [number, number] => {
  let lo = Number.POSITIVE_INFINITY
  let hi = Number.NEGATIVE_INFINITY
  for (const v of values) {
    if (v < lo) lo = v
    if (v > hi) hi = v
  }
  return [lo, hi]
}

/** The steps axis spans exactly the logged steps: widened to a round number it would show a run stopping short. */
const stepDomain = (steps: ReadonlyArray<number>): [number, number] => {
  const [lo, hi] = extent(steps)
  return hi > lo ? [lo, hi] : [lo - 1, hi + 1]
}

/** The range of the values widened to whole ticks, so the curve never touches the frame unlabelled. */
const valueDomain = (values: ReadonlyArray<number>): [number, number] => {
  let [lo, hi] = extent(values)
  if (hi === lo) {
    const pad = Math.abs(lo) * 0.1 || 1
    lo -= pad
    hi += pad
  }
  const t = niceTicks(lo, hi)
  const step = t.length > 1 ? t[1]! - t[0]! : hi - lo
  return [Math.min(lo, Math.floor(lo / step) * step), Math.max(hi, Math.ceil(hi / step) * step)]
}

/** Keeps at most `max` points: the minimum and maximum of each bucket, in step order. */
export const decimate = (
  points: ReadonlyArray<readonly [number, number]>,
  max: number,
): ReadonlyArray<readonly [number, number]> => {
  if (points.length <= max) return points
  const buckets = Math.max(1, Math.floor(max / 2))
  const size = Math.ceil(points.length / buckets)
  const out: Array<readonly [number, number]> = []
  for (let b = 0; b < points.length; b += size) {
    const slice = points.slice(b, b + size)
    let lo = slice[0]!
    let hi = slice[0]!
    for (const p of slice) {
      if (p[1] < lo[1]) lo = p
      if (p[1] > hi[1]) hi = p
    }
    if (lo === hi) out.push(lo)
    else out.push(...(lo[0] < hi[0] ? [lo, hi] : [hi, lo]))
  }
  return out
}

const num = (v: number) => String(Math.round(v * 10) / 10)

/** One chart as an `<svg>` element; "no data yet" while every series is empty. */
export const lineChart = (series: ReadonlyArray<ChartSeries>, options: ChartOptions): string => {
  const width = options.width ?? 640
  const height = options.height ?? 240
  const format = options.format ?? formatValue
  const maxPoints = options.maxPoints ?? 4000
  const title = escapeHtml(options.title)
  const plotW = width - margin.left - margin.right
  const plotH = height - margin.top - margin.bottom
  const finite = series.map((s) => s.points.filter((p) => Number.isFinite(p[1])))
  const all = finite.flat()
  const head = series[0]?.points.at(-1)
  const headline = head !== undefined ? `${format(head[1])} at step ${head[0]}` : "no data yet"
  const legend =
    series.length > 1
      ? series
          .map(
            (s, i) =>
              `<tspan class="${s.className}-text" dx="${i === 0 ? 0 : 12}">— ${escapeHtml(s.name)}</tspan>`,
          )
          .join("")
      : ""
  const open =
    `<svg class="chart" viewBox="0 0 ${width} ${height}" role="img" xmlns="http://www.w3.org/2000/svg">` +
    `<title>${title}: ${headline}</title>` +
    `<text class="chart-title" x="${margin.left}" y="18">${title}</text>` +
    `<text class="chart-headline" x="${width - margin.right}" y="18" text-anchor="end">${headline}</text>` +
    (legend ? `<text class="chart-legend" x="${margin.left}" y="${height - 4}">${legend}</text>` : "")
  if (all.length === 0) {
    return (
      open +
      `<rect class="frame" x="${margin.left}" y="${margin.top}" width="${plotW}" height="${plotH}"/>` +
      `<text class="empty" x="${margin.left + plotW / 2}" y="${margin.top + plotH / 2}" text-anchor="middle">no data yet</text></svg>`
    )
  }
  const steps = series.flatMap((s) => s.points.map((p) => p[0]))
  const [x0, x1] = stepDomain(steps)
  const [y0, y1] = valueDomain(all.map((p) => p[1]))
  const x = (v: number) => margin.left + ((v - x0) / (x1 - x0)) * plotW
  const y = (v: number) => margin.top + plotH - ((v - y0) / (y1 - y0)) * plotH
  const parts: string[] = [open]
  parts.push(`<rect class="frame" x="${margin.left}" y="${margin.top}" width="${plotW}" height="${plotH}"/>`)
  for (const t of niceTicks(y0, y1)) {
    const ty = num(y(t))
    parts.push(
      `<line class="grid" x1="${margin.left}" x2="${margin.left + plotW}" y1="${ty}" y2="${ty}"/>` +
        `<text class="tick" x="${margin.left - 6}" y="${ty}" dy="0.32em" text-anchor="end">${format(t)}</text>`,
    )
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    const tx = num(x(t))
    parts.push(
      `<line class="grid" x1="${tx}" x2="${tx}" y1="${margin.top}" y2="${margin.top + plotH}"/>` +
        `<text class="tick" x="${tx}" y="${margin.top + plotH + 16}" text-anchor="middle">${t}</text>`,
    )
  }
  series.forEach((s) => {
    const kept = decimate(s.points, maxPoints)
    let d = ""
    let pen = false
    let count = 0
    for (const [sx, sy] of kept) {
      if (!Number.isFinite(sy)) {
        pen = false
        continue
      }
      d += `${pen ? "L" : "M"}${num(x(sx))} ${num(y(sy))}`
      pen = true
      count++
    }
    // A lone point has no length to stroke: a dot shows it.
    if (count === 1) {
      const [px, py] = kept.find((p) => Number.isFinite(p[1]))!
      parts.push(
        `<circle class="${s.className}-dot" data-series="${escapeHtml(s.name)}" cx="${num(x(px))}" cy="${num(y(py))}" r="3"/>`,
      )
    }
    parts.push(
      `<path class="series ${s.className}" data-series="${escapeHtml(s.name)}" data-points="${count}" d="${d}"/>`,
    )
    const gaps = s.points.filter((p) => !Number.isFinite(p[1])).slice(0, 500)
    for (const [gx] of gaps)
      parts.push(
        `<line class="gap" x1="${num(x(gx))}" x2="${num(x(gx))}" y1="${margin.top + plotH - 6}" y2="${margin.top + plotH}"/>`,
      )
  })
  parts.push(
    `<text class="axis-label" x="${margin.left + plotW}" y="${height - 4}" text-anchor="end">step</text>`,
  )
  parts.push("</svg>")
  return parts.join("")
}
