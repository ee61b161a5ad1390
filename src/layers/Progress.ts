/**
 * The training progress a person watches: step/total, loss, learning rate, tokens/s, MFU (only
 * where the devices' peak FLOP/s is known, so never a made-up number on the CPU) and ETA.
 *
 * On a terminal it is one line redrawn in place, at most every `minRedrawMs` (a fast CPU run logs
 * hundreds of steps a second, and each redraw is a write to the terminal). Anywhere else (CI logs,
 * pipes, files, tests) it is a plain line per update, with no control characters; updates come
 * every `--log-every` steps, which is the only moment the loop reads the loss back anyway.
 */
import { Effect } from "effect"
import {
  formatCount,
  formatDuration,
  formatLearningRate,
  formatPercent,
  formatValue,
} from "./report/format.ts"

/** What one progress line shows (StepMetrics has all of it). */
export interface ProgressFields {
  readonly step: number
  readonly loss: number
  readonly learningRate: number
  readonly tokensPerSecond: number
  readonly mfu?: number
  readonly etaSeconds?: number
  readonly elapsedSeconds?: number
}

/** Where progress goes: stderr by default, so it never mixes with a command's output on stdout. */
export interface ProgressSink {
  readonly isTTY: boolean
  /** Terminal width: a redrawn line longer than it would wrap and no longer redraw in place. */
  readonly columns?: number
  readonly write: (text: string) => void
}

export interface ProgressOptions {
  readonly sink?: ProgressSink
  readonly minRedrawMs?: number
  readonly now?: () => number
}

export interface Progress {
  /** Shows a logged step of a run that stops at `total`. */
  readonly update: (m: ProgressFields, total: number) => Effect.Effect<void>
  /** Prints a line of its own (a warning) without tearing the redrawn line: it is drawn again below. */
  readonly message: (text: string) => Effect.Effect<void>
  /** Draws a step held back by the throttle and ends the redrawn line, so that later output starts on its own line. */
  readonly end: Effect.Effect<void>
}

// Four significant digits with the trailing zeros kept, so the line does not jitter in width.
const formatLoss = (v: number) => {
  const a = Math.abs(v)
  return Number.isFinite(v) && a >= 1e-2 && a < 1e5 ? v.toPrecision(4) : formatValue(v)
}

const bar = (fraction: number, width: number) => {
  const done = Math.max(0, Math.min(width, Math.round(fraction * width)))
  return `[${"#".repeat(done)}${"-".repeat(width - done)}]`
}

/** The fields after the step count, identical in both styles. */
const fields = (m: ProgressFields, total: number) => {
  const parts = [
    `loss ${formatLoss(m.loss)}`,
    `lr ${formatLearningRate(m.learningRate)}`,
    `${formatCount(m.tokensPerSecond)} tok/s`,
  ]
  if (m.mfu !== undefined) parts.push(`mfu ${formatPercent(m.mfu)}`)
  parts.push(
    m.step >= total && m.elapsedSeconds !== undefined
      ? `took ${formatDuration(m.elapsedSeconds)}`
      : `eta ${formatDuration(m.etaSeconds)}`,
  )
  return parts.join("  ")
}

/** A terminal line: a bar and the fields. */
export const formatProgressBar = (m: ProgressFields, total: number): string => {
  const fraction = total > 0 ? m.step / total : 0
  const pct = `${Math.floor(fraction * 100)}%`.padStart(4)
  return `${bar(fraction, 20)} ${pct}  step ${m.step}/${total}  ${fields(m, total)}`
}

/** A log line: plain text, one per update. */
export const formatProgressLine = (m: ProgressFields, total: number): string =>
  `magix: step ${m.step}/${total}  ${fields(m, total)}`

const stderrSink = (): ProgressSink => ({
  isTTY: process.stderr.isTTY === true,
  ...(process.stderr.columns ? { columns: process.stderr.columns } : {}),
  write: (text) => {
    process.stderr.write(text)
  },
})

export const makeProgress = (options: ProgressOptions = {}): Progress => {
  const sink = options.sink ?? stderrSink()
  const now = options.now ?? (() => performance.now())
  const minRedrawMs = options.minRedrawMs ?? 100
  let lastDraw = Number.NEGATIVE_INFINITY
  let pending: { readonly m: ProgressFields; readonly total: number } | undefined
  let open: string | undefined
  const draw = (m: ProgressFields, total: number) => {
    let line = formatProgressBar(m, total)
    const columns = sink.columns
    if (columns !== undefined && line.length >= columns) line = line.slice(0, Math.max(0, columns - 1))
    // \r back to the start, then erase the line: a shorter line leaves nothing of the longer one.
    sink.write(`\r\x1b[2K${line}`)
    open = line
    lastDraw = now()
    pending = undefined
  }
  return {
    update: (m, total) =>
      Effect.sync(() => {
        if (!sink.isTTY) {
          sink.write(`${formatProgressLine(m, total)}\n`)
          return
        }
        if (m.step >= total || now() - lastDraw >= minRedrawMs) draw(m, total)
        else pending = { m, total }
      }),
    message: (text) =>
      Effect.sync(() => {
        if (open === undefined) sink.write(`${text}\n`)
        else sink.write(`\r\x1b[2K${text}\n${open}`)
      }),
    end: Effect.sync(() => {
      if (pending) draw(pending.m, pending.total)
      if (open !== undefined) sink.write("\n")
      open = undefined
    }),
  }
}
