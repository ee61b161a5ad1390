/**
 * What the pipeline takes from one dataset row: the value of one field, either text or a chat
 * (a list of {role, content} messages, rendered later with the tokenizer's chat template).
 */
import { DatasetFieldInvalid, DatasetFieldMissing } from "./errors.ts"

/** One chat message; any other keys (tool calls, names) pass through to the template. */
export interface ChatMessage {
  readonly role: string
  readonly content: unknown
  readonly [key: string]: unknown
}

export type Example = string | ReadonlyArray<ChatMessage>

/** Where a row came from, for errors: a 1-based line of a text file or a 0-based Parquet row. */
export interface RowLocation {
  readonly file: string
  readonly line?: number
  readonly row?: number
}

const describeValue = (v: unknown): string =>
  v === null ? "is null" : Array.isArray(v) ? "is a list" : `is a ${typeof v}`

const isRecord = (v: unknown): v is Readonly<Record<string, unknown>> =>
  typeof v === "object" && v !== null && !Array.isArray(v)

/**
 * The value of `field` in `row` as an Example. A field holding a list must be a list of
 * messages, each an object with a string `role` and a `content`. Throws the typed error.
 */
export const selectField = (row: unknown, field: string, at: RowLocation): Example => {
  const loc = { file: at.file, field, ...(at.line === undefined ? {} : { line: at.line }) }
  const located = at.row === undefined ? loc : { ...loc, row: at.row }
  if (!isRecord(row)) throw new DatasetFieldMissing({ ...located, available: [] })
  if (!Object.hasOwn(row, field)) throw new DatasetFieldMissing({ ...located, available: Object.keys(row) })
  const value = row[field]
  if (typeof value === "string") return value
  if (Array.isArray(value)) {
    value.forEach((m: unknown, i) => {
      if (!isRecord(m) || typeof m.role !== "string" || !Object.hasOwn(m, "content"))
        throw new DatasetFieldInvalid({
          ...located,
          detail: `is a list whose item ${i} is not a {role, content} message`,
        })
    })
    return value as ReadonlyArray<ChatMessage>
  }
  throw new DatasetFieldInvalid({ ...located, detail: describeValue(value) })
}
