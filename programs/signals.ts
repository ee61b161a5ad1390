/**
 * Ctrl-C and `kill`: NodeRuntime.runMain turns SIGINT and SIGTERM into interruption of the main
 * fiber, so finalizers run (a checkpoint in flight completes, device memory and communicators are
 * released). This module remembers which signal came, so the exit code says so (128 + signal
 * number: 130 for SIGINT, 143 for SIGTERM, the shell convention), prints one line instead of a
 * trace, and makes a second signal leave at once for someone who will not wait.
 */
import { Cause, Exit, Runtime } from "effect"

type Signal = "SIGINT" | "SIGTERM"

const exitCodes: Record<Signal, number> = { SIGINT: 130, SIGTERM: 143 }

let received: Signal | undefined
let hint: string | undefined

/** Exit code for a run stopped by this signal. */
export const exitCodeOf = (signal: Signal): number => exitCodes[signal]

/** What to tell a person whose run was interrupted (e.g. how to resume); the latest wins. */
export const setInterruptHint = (text: string): void => {
  hint = text
}

const onSignal = (signal: Signal) => {
  if (received !== undefined) {
    // Finalizers are still running; a temporary checkpoint left now is removed by the next run.
    process.stderr.write(`\nmagix: ${signal} again, exiting now\n`)
    process.exit(exitCodes[signal])
  }
  received = signal
}

/**
 * Listens for the signals; call before NodeRuntime.runMain so this listener runs before the one
 * that interrupts the fiber.
 */
export const watchSignals = (): void => {
  process.on("SIGINT", () => onSignal("SIGINT"))
  process.on("SIGTERM", () => onSignal("SIGTERM"))
}

/** runMain's teardown: an interruption by a signal exits 128 + signal with one line. */
export const teardown: Runtime.Teardown = (exit, onExit) => {
  if (received !== undefined && Exit.isFailure(exit) && Cause.hasInterruptsOnly(exit.cause)) {
    process.stderr.write(`magix: interrupted by ${received}${hint ? `; ${hint}` : ""}\n`)
    return onExit(exitCodes[received])
  }
  return Runtime.defaultTeardown(exit, onExit)
}
