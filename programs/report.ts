/**
 * What a person sees: failures in one or two lines with the fix (never a stack trace for a
 * mistake they can make), and a progress line for training.
 */
import { Cause, Effect } from "effect"

const isTagged = (e: unknown): e is { _tag: string; message: string } =>
  typeof e === "object" && e !== null && typeof (e as { _tag?: unknown })._tag === "string"

/** Runs a command's effect; a typed failure prints `magix: <message>` and exits 1. */
export const reportFailures = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
): Effect.Effect<A | undefined, never, R> =>
  effect.pipe(
    Effect.catchCause((cause) =>
      Effect.sync(() => {
        if (Cause.hasInterruptsOnly(cause)) {
          process.stderr.write("magix: interrupted\n")
          process.exitCode = 130
          return undefined
        }
        const failure = Cause.findErrorOption(cause)
        if (failure._tag === "Some") {
          const e = failure.value
          // CLI parse errors are already printed by effect/cli with the help.
          if (isTagged(e) && e._tag.startsWith("Cli")) process.exitCode = 2
          else {
            process.stderr.write(`magix: ${isTagged(e) ? e.message : String(e)}\n`)
            process.exitCode = 1
          }
          return undefined
        }
        const defect = Cause.squash(cause)
        process.stderr.write(
          `magix: internal error: ${defect instanceof Error ? defect.message : String(defect)}\n`,
        )
        if (process.env.MAGIX_DEBUG) process.stderr.write(`${Cause.pretty(cause)}\n`)
        process.exitCode = 70
        return undefined
      }),
    ),
  )

const duration = (s: number) => {
  if (!Number.isFinite(s)) return "?"
  const m = Math.floor(s / 60)
  return m > 0 ? `${m}m${String(Math.round(s % 60)).padStart(2, "0")}s` : `${s.toFixed(0)}s`
}

export interface ProgressLine {
  readonly step: number
  readonly total: number
  readonly loss: number
  readonly learningRate: number
  readonly tokensPerSecond: number
  readonly mfu?: number
  readonly etaSeconds?: number
}

/** A progress bar on a terminal, a plain line every so often elsewhere. */
export const progressPrinter = () => {
  const tty = process.stderr.isTTY === true
  let lastPlain = 0
  return (p: ProgressLine) =>
    Effect.sync(() => {
      const width = 24
      const done = Math.min(width, Math.round((p.step / Math.max(1, p.total)) * width))
      const bar = `[${"#".repeat(done)}${".".repeat(width - done)}]`
      const mfu = p.mfu !== undefined ? `  mfu ${(p.mfu * 100).toFixed(1)}%` : ""
      const line =
        `${bar} step ${p.step}/${p.total}  loss ${p.loss.toFixed(4)}  lr ${p.learningRate.toExponential(2)}  ` +
        `${Math.round(p.tokensPerSecond)} tok/s${mfu}  eta ${duration(p.etaSeconds ?? Number.NaN)}`
      if (tty) process.stderr.write(`\r\x1b[2K${line}${p.step >= p.total ? "\n" : ""}`)
      else if (p.step >= p.total || performance.now() - lastPlain > 5000 || p.step === 1) {
        lastPlain = performance.now()
        process.stderr.write(`${line}\n`)
      }
    })
}
