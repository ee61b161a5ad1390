/**
 * Datasets for `magix train` and `magix generate`: a local `.jsonl` / `.parquet` / `.txt` file, a
 * local directory laid out like a Hub dataset, or a Hub dataset repository (`--train-file
 * org/name` with a config and split), read through the Hub service. Opening a dataset indexes its
 * files (see data/reader.ts); examples are then read by number, which is what the shuffled,
 * multi-process batching of core/data/batching.ts needs, and what the worker threads of
 * data/BatchStream.ts do.
 *
 * Every file name that comes from a repository is checked to stay inside the dataset's directory,
 * here as well as in the Hub layer.
 */
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { Effect } from "effect"
import {
  attemptSync,
  type DatasetError,
  DatasetFieldInvalid,
  DatasetFileError,
  DatasetSplitNotFound,
  dataErrorClasses,
  hasTag,
} from "../core/data/errors.ts"
import type { Example, RowLocation } from "../core/data/examples.ts"
import { checkDataPath, dataFilesOf, kindOf, selectSplitFiles } from "./data/files.ts"
import { type DatasetIndex, DocumentReader, indexDataset } from "./data/reader.ts"
import { Hub, type HubError } from "./Hub.ts"
import { isTokenizerError, type Tokenizer, type TokenizerError } from "./Tokenizer.ts"

export {
  type BatchingOptions,
  type BatchMode,
  DataPosition,
  IGNORE_INDEX,
  mergeDataPositions,
  type TrainBatch,
} from "../core/data/batching.ts"
export type { ChatMessage, Example } from "../core/data/examples.ts"
export {
  type GenerationBatch,
  inInputOrder,
  type PromptBatchOptions,
  promptBatches,
} from "../core/data/prompts.ts"
export {
  type BatchStream,
  type BatchStreamOptions,
  type BatchStreamStats,
  liveBatchWorkers,
  makeBatchStream,
} from "./data/BatchStream.ts"
export { type DocumentOptions, exampleTokens } from "./data/documents.ts"
export type { DataError } from "./data/protocol.ts"
export type { DatasetIndex, IndexedFile, ReadExample } from "./data/reader.ts"

export interface DatasetSpec {
  /** A local file, a local directory, or a Hub dataset id (org/name). */
  readonly path: string
  /** The field examples are read from (`--train-data-field`); "text" by default. Ignored for .txt. */
  readonly field?: string
  /** "train" by default. */
  readonly split?: string
  /** The dataset's configuration (subset) name (`--train-data-config`). */
  readonly config?: string
  /** Branch, tag or commit of a Hub repository. */
  readonly revision?: string
}

const isDatasetError = hasTag<DatasetError>(dataErrorClasses)

const fromPromise = <A>(f: () => Promise<A>): Effect.Effect<A, DatasetError> =>
  Effect.flatMap(
    Effect.promise(() =>
      f().then(
        (value) => ({ ok: true as const, value }),
        (error: unknown) => ({ ok: false as const, error }),
      ),
    ),
    (r) =>
      r.ok ? Effect.succeed(r.value) : isDatasetError(r.error) ? Effect.fail(r.error) : Effect.die(r.error),
  )

const statOf = (p: string) =>
  fs.stat(p).then(
    (s) => s,
    () => undefined,
  )

/** The local files of a dataset, with the names errors should use. */
const dataFiles = (
  spec: DatasetSpec,
): Effect.Effect<ReadonlyArray<{ path: string; name: string }>, DatasetError | HubError, Hub> =>
  Effect.gen(function* () {
    const stat = yield* Effect.promise(() => statOf(spec.path))
    if (stat?.isFile()) return [{ path: path.resolve(spec.path), name: spec.path }]
    if (stat === undefined && kindOf(spec.path) !== undefined)
      return yield* new DatasetFileError({ file: spec.path, detail: "no such file" })
    const hub = yield* Hub
    const options = {
      repoType: "dataset" as const,
      ...(spec.revision === undefined ? {} : { revision: spec.revision }),
    }
    const listing = yield* hub.listFiles(spec.path, options)
    const split = spec.split ?? "train"
    const chosen = selectSplitFiles(listing, split, spec.config)
    if (chosen.length === 0)
      return yield* new DatasetSplitNotFound({
        repo: spec.path,
        split,
        ...(spec.config === undefined ? {} : { config: spec.config }),
        files: dataFilesOf(listing),
      })
    return yield* Effect.forEach(
      chosen,
      (rel) =>
        hub.resolveFile(spec.path, rel, options).pipe(
          Effect.flatMap((resolved) => fromPromise(() => checkDataPath(spec.path, rel, resolved))),
          Effect.map((p) => ({ path: p, name: `${spec.path}/${rel}` })),
        ),
      { concurrency: 4 },
    )
  })

/** Finds, fetches and indexes a dataset's files for one split; checks the first example of each. */
export const openDataset = (spec: DatasetSpec): Effect.Effect<DatasetIndex, DatasetError | HubError, Hub> =>
  Effect.flatMap(dataFiles(spec), (files) =>
    fromPromise(() => indexDataset(spec.path, files, spec.field ?? "text")),
  )

/** The examples numbered `docs` (0-based over the dataset's files), with where each came from. */
export const readExamples = (
  index: DatasetIndex,
  docs: ReadonlyArray<number>,
): Effect.Effect<ReadonlyArray<{ readonly example: Example; readonly at: RowLocation }>, DatasetError> =>
  Effect.acquireUseRelease(
    Effect.sync(() => new DocumentReader(index)),
    (reader) => fromPromise(() => reader.read(docs)),
    (reader) => Effect.sync(() => reader.close()),
  )

/** Every example of a dataset in file order: generate's prompts. */
export const loadExamples = (
  spec: DatasetSpec,
): Effect.Effect<ReadonlyArray<Example>, DatasetError | HubError, Hub> =>
  Effect.flatMap(openDataset(spec), (index) =>
    Effect.map(
      readExamples(
        index,
        Array.from({ length: index.count }, (_, i) => i),
      ),
      (rows) => rows.map((r) => r.example),
    ),
  )

/**
 * Generation prompts as token ids, in file order: text encoded with special tokens but never an
 * appended EOS (generate.py loads its tokenizer with add_eos_token=False); a chat rendered with the
 * chat template and its generation prompt, encoded without adding special tokens.
 */
export const loadPrompts = (
  spec: DatasetSpec,
  tokenizer: Tokenizer,
  options: { readonly useChatTemplate?: boolean } = {},
): Effect.Effect<ReadonlyArray<ReadonlyArray<number>>, DatasetError | TokenizerError | HubError, Hub> =>
  Effect.gen(function* () {
    const index = yield* openDataset(spec)
    const rows = yield* readExamples(
      index,
      Array.from({ length: index.count }, (_, i) => i),
    )
    return yield* attemptSync(
      () =>
        rows.map(({ example, at }) => {
          if (typeof example === "string") return tokenizer.encode(example, { addEosToken: false })
          if (!options.useChatTemplate)
            throw new DatasetFieldInvalid({
              file: at.file,
              field: index.field,
              ...(at.line === undefined ? {} : { line: at.line }),
              ...(at.row === undefined ? {} : { row: at.row }),
              detail: "is a list of chat messages and the chat template is off (turn on useChatTemplate)",
            })
          return tokenizer.encode(tokenizer.renderChat(example, { addGenerationPrompt: true }), {
            addSpecialTokens: false,
          })
        }),
      (e): e is DatasetError | TokenizerError => isDatasetError(e) || isTokenizerError(e),
    )
  })
