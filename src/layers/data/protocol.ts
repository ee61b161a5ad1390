/**
 * Messages between the batch stream and its worker threads. Everything is plain data: the dataset
 * index (its offsets in shared memory), the tokenizer's file paths, the batching options, and
 * typed errors as their tag and fields, rebuilt on the main thread as the same error classes.
 */
import type { BatchingOptions, DataPosition, StepRows } from "../../core/data/batching.ts"
import { type BatchingError, type DatasetError, dataErrorClasses } from "../../core/data/errors.ts"
import { type TokenizerError, type TokenizerSource, tokenizerErrorClasses } from "../Tokenizer.ts"
import type { DatasetIndex } from "./reader.ts"

export type DataError = DatasetError | BatchingError | TokenizerError

export interface WorkerInit {
  readonly type: "init"
  readonly index: DatasetIndex
  readonly tokenizer: TokenizerSource
  readonly batching: BatchingOptions
  readonly lanes: ReadonlyArray<number>
  readonly start: DataPosition | undefined
  readonly useChatTemplate: boolean
}

/** Build `count` more steps (the consumer's free queue slots). */
export interface WorkerProduce {
  readonly type: "produce"
  readonly count: number
}

export type ToWorker = WorkerInit | WorkerProduce

export type FromWorker =
  | { readonly type: "ready" }
  | { readonly type: "rows"; readonly rows: StepRows }
  | { readonly type: "end" }
  | { readonly type: "error"; readonly error: EncodedError }

/** A typed error as tag and fields; anything else (a bug) as message and stack. */
export interface EncodedError {
  readonly tag: string | undefined
  readonly fields: Readonly<Record<string, unknown>>
  readonly message: string
  readonly stack: string | undefined
}

const classes: Readonly<Record<string, new (fields: never) => DataError>> = {
  ...dataErrorClasses,
  ...tokenizerErrorClasses,
}

export const isDataError = (e: unknown): e is DataError =>
  typeof e === "object" && e !== null && Object.hasOwn(classes, (e as { _tag?: unknown })._tag as string)

export const encodeError = (e: unknown): EncodedError => {
  if (isDataError(e)) {
    const fields = Object.fromEntries(Object.entries(e).filter(([k]) => k !== "_tag"))
    return { tag: e._tag, fields, message: e.message, stack: undefined }
  }
  return {
    tag: undefined,
    fields: {},
    message: e instanceof Error ? e.message : String(e),
    stack: e instanceof Error ? e.stack : undefined,
  }
}

/** The typed error again, or an Error for a defect (keeping the worker's stack). */
export const decodeError = (e: EncodedError): DataError | Error => {
  const cls = e.tag === undefined ? undefined : classes[e.tag]
  if (cls !== undefined) return new cls(e.fields as never)
  const error = new Error(`batch worker failed: ${e.message}`)
  if (e.stack !== undefined) error.stack = `${error.message}\n--- in the worker ---\n${e.stack}`
  return error
}
