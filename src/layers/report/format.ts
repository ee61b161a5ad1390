/**
 * How numbers read to a person, shared by the progress line and the HTML report so both say the
 * same thing about the same step; and HTML escaping, for every string the report did not write.
 */

/** Text safe inside HTML elements and double-quoted attributes. */
export const escapeHtml = (s: string): string => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`)

/** `45s`, `3m05s`, `2h07m`; `?` when unknown (a first step has no rate yet). */
export const formatDuration = (seconds: number | undefined): string => {
  if (seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "?"
  const s = Math.round(seconds)
  if (s < 60) return `${s}s`
  const m = Math.floor(s / 60)
  if (m < 60) return `${m}m${String(s % 60).padStart(2, "0")}s`
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, "0")}m`
}

/** `950`, `21.3k`, `4.10M`: rates span six orders of magnitude between the CPU and a GPU node. */
export const formatCount = (v: number): string => {
  if (!Number.isFinite(v)) return String(v)
  const a = Math.abs(v)
  if (a >= 1e9) return `${(v / 1e9).toFixed(2)}G`
  if (a >= 1e6) return `${(v / 1e6).toFixed(2)}M`
  if (a >= 1e4) return `${(v / 1e3).toFixed(1)}k`
  return a >= 100 ? v.toFixed(0) : v.toPrecision(3).replace(/\.?0+$/, "")
}

/** Four significant digits, switching to exponent form for learning rates and tiny or huge values. */
export const formatValue = (v: number): string => {
  if (!Number.isFinite(v)) return Number.isNaN(v) ? "nan" : v > 0 ? "inf" : "-inf"
  if (v === 0) return "0"
  const a = Math.abs(v)
  if (a < 1e-2 || a >= 1e5) return v.toExponential(2)
  return String(Number(v.toPrecision(4)))
}

/** Always in exponent form, so that a warmup from 0 to 3e-4 keeps one shape on the line: `1.39e-4`. */
export const formatLearningRate = (v: number): string =>
  v === 0 || !Number.isFinite(v) ? formatValue(v) : v.toExponential(2)

/** A fraction as a percentage with one decimal. */
export const formatPercent = (fraction: number): string => `${(fraction * 100).toFixed(1)}%`

/** Bytes in binary units, as memory tools print them. */
export const formatBytes = (bytes: number): string => {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"]
  let v = bytes
  let u = 0
  while (Math.abs(v) >= 1024 && u < units.length - 1) {
    v /= 1024
    u++
  }
  return `${u === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[u]}`
}
