/**
 * Errors of the data pipeline a user can cause: a bad dataset file, a field that is not there,
 * batching options that cannot work, a saved data position that belongs to another run. They are
 * plain data (strings and numbers), so a tokenization worker can send one to the main thread and
 * it arrives as the same typed error (see `dataErrorClasses`).
 */
import { Effect, Schema } from "effect"

/** "file, line 3" / "file, row 7" / "file": where in a dataset file something was found. */
const where = (file: string, line: number | undefined, row: number | undefined) =>
  line !== undefined ? `${file}, line ${line}` : row !== undefined ? `${file}, row ${row}` : file

/** A line of a JSON Lines file that is not one JSON object. */
export class DatasetParseError extends Schema.TaggedError<DatasetParseError>()("DatasetParseError", {
  file: Schema.String,
  /** 1-based. */
  line: Schema.Number,
  detail: Schema.String,
}) {
  override get message() {
    return (
      `${where(this.file, this.line, undefined)}: not a JSON object (${this.detail}). ` +
      'Each line of a .jsonl file must hold one JSON object such as {"text": "..."}: fix or remove the line'
    )
  }
}

/** An example without the field the pipeline reads (`--train-data-field`). */
export class DatasetFieldMissing extends Schema.TaggedError<DatasetFieldMissing>()("DatasetFieldMissing", {
  file: Schema.String,
  field: Schema.String,
  /** 1-based line of a .jsonl file. */
  line: Schema.optional(Schema.Number),
  /** 0-based row of a .parquet file. */
  row: Schema.optional(Schema.Number),
  /** The fields that example (or the file's schema) does have. */
  available: Schema.Array(Schema.String),
}) {
  override get message() {
    const has = this.available.length > 0 ? this.available.map((f) => `"${f}"`).join(", ") : "none"
    return (
      `${where(this.file, this.line, this.row)} has no field "${this.field}" (it has ${has}). ` +
      "Name the field that holds the text with --train-data-field (or `field`), or fix the example"
    )
  }
}

/** The field is there but holds neither text nor a list of chat messages. */
export class DatasetFieldInvalid extends Schema.TaggedError<DatasetFieldInvalid>()("DatasetFieldInvalid", {
  file: Schema.String,
  field: Schema.String,
  line: Schema.optional(Schema.Number),
  row: Schema.optional(Schema.Number),
  detail: Schema.String,
}) {
  override get message() {
    return (
      `${where(this.file, this.line, this.row)}: field "${this.field}" ${this.detail}. ` +
      "It must be a string, or (with the chat template turned on) a list of {role, content} messages"
    )
  }
}

/** A dataset file (or the files of a split) with no examples at all. */
export class DatasetEmpty extends Schema.TaggedError<DatasetEmpty>()("DatasetEmpty", {
  file: Schema.String,
}) {
  override get message() {
    return `${this.file} holds no examples: check that it is the right file (and, for a Hub dataset, the split and config)`
  }
}

/** A local dataset path that does not exist or cannot be read. */
export class DatasetFileError extends Schema.TaggedError<DatasetFileError>()("DatasetFileError", {
  file: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `cannot read dataset file ${this.file}: ${this.detail}. Check the path and its permissions`
  }
}

/** A file kind the pipeline does not read, or a Parquet codec hyparquet cannot decode. */
export class DatasetFormatUnsupported extends Schema.TaggedError<DatasetFormatUnsupported>()(
  "DatasetFormatUnsupported",
  { file: Schema.String, detail: Schema.String, fix: Schema.String },
) {
  override get message() {
    return `${this.file}: ${this.detail}. ${this.fix}`
  }
}

/** No data file of a Hub (or local directory) dataset matches the split and config asked for. */
export class DatasetSplitNotFound extends Schema.TaggedError<DatasetSplitNotFound>()("DatasetSplitNotFound", {
  repo: Schema.String,
  split: Schema.String,
  config: Schema.optional(Schema.String),
  /** Some of the data files the repository does have. */
  files: Schema.Array(Schema.String),
}) {
  override get message() {
    const config = this.config === undefined ? "" : ` (config "${this.config}")`
    const some = this.files.slice(0, 8).join(", ")
    const has =
      this.files.length === 0 ? "it has no .parquet, .jsonl or .txt files" : `its data files: ${some}`
    const more = this.files.length > 8 ? `, ... (${this.files.length} in all)` : ""
    return (
      `dataset "${this.repo}" has no data files for split "${this.split}"${config}; ${has}${more}. ` +
      "Pass the split and config name the dataset uses (--train-data-config), or point at a file"
    )
  }
}

/** A data file name from a repository that would read outside the dataset's directory. */
export class DatasetUnsafePath extends Schema.TaggedError<DatasetUnsafePath>()("DatasetUnsafePath", {
  repo: Schema.String,
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message() {
    return (
      `refused data file "${this.path}" of dataset "${this.repo}": ${this.reason}. ` +
      "A dataset's files must stay inside its directory; the repository is malformed or hostile"
    )
  }
}

/** Batching options that cannot work (checked before any data is read). */
export class BatchingOptionsInvalid extends Schema.TaggedError<BatchingOptionsInvalid>()(
  "BatchingOptionsInvalid",
  { option: Schema.String, value: Schema.Number, reason: Schema.String },
) {
  override get message() {
    return `${this.option} = ${this.value} cannot be used: ${this.reason}`
  }
}

/** Fewer documents than rows in one batch: not one full batch per epoch (the last is dropped). */
export class DatasetTooSmall extends Schema.TaggedError<DatasetTooSmall>()("DatasetTooSmall", {
  documents: Schema.Number,
  batchSize: Schema.Number,
}) {
  override get message() {
    return (
      `the dataset has ${this.documents} examples, fewer than the batch size ${this.batchSize}, so an epoch ` +
      "has no full batch (incomplete batches are dropped). Use a smaller --batch-size or more data"
    )
  }
}

/** A saved data position that does not belong to this dataset and batching setup. */
export class DataPositionMismatch extends Schema.TaggedError<DataPositionMismatch>()("DataPositionMismatch", {
  detail: Schema.String,
}) {
  override get message() {
    return (
      `cannot resume from the saved data position: ${this.detail}. Resume with the dataset, tokenizer, ` +
      "seed, batch size, max length and batching mode of the run that saved it, or start the data afresh"
    )
  }
}

export type DatasetError =
  | DatasetParseError
  | DatasetFieldMissing
  | DatasetFieldInvalid
  | DatasetEmpty
  | DatasetFileError
  | DatasetFormatUnsupported
  | DatasetSplitNotFound
  | DatasetUnsafePath

export type BatchingError = BatchingOptionsInvalid | DatasetTooSmall | DataPositionMismatch

/** Every data error by tag, to rebuild one that crossed a thread boundary as plain fields. */
export const dataErrorClasses = {
  DatasetParseError,
  DatasetFieldMissing,
  DatasetFieldInvalid,
  DatasetEmpty,
  DatasetFileError,
  DatasetFormatUnsupported,
  DatasetSplitNotFound,
  DatasetUnsafePath,
  BatchingOptionsInvalid,
  DatasetTooSmall,
  DataPositionMismatch,
} as const

/** Runs synchronous code that throws typed errors: those `expected` accepts fail, others are defects. */
export const attemptSync = <A, E>(f: () => A, expected: (e: unknown) => e is E): Effect.Effect<A, E> =>
  Effect.suspend(() => {
    try {
      return Effect.succeed(f())
    } catch (e) {
      return expected(e) ? Effect.fail(e) : Effect.die(e)
    }
  })

/** A guard for errors of the given tags. */
export const hasTag =
  <E>(tags: Readonly<Record<string, unknown>>) =>
  (e: unknown): e is E =>
    typeof e === "object" && e !== null && Object.hasOwn(tags, (e as { _tag?: unknown })._tag as string)
