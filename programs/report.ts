/**
 * What a person sees when something goes wrong: failures in one or two lines with the fix (never
 * a stack trace for a mistake they can make). Training progress is src/layers/Progress.ts.
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
