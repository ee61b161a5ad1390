/**
 * Batching options and the plan derived from them and the number of documents: the global batch
 * shape, this process's rows, and the per-epoch document order (see batching.ts).
 */
import type { Effect } from "effect"
import { attemptSync, BatchingOptionsInvalid, DatasetTooSmall } from "./errors.ts"
import { epochPermutation } from "./shuffle.ts"

/** The target of a position that predicts nothing (padding, or the end of a document). */
export const IGNORE_INDEX = -100

export type BatchMode = "padding" | "packing"

export interface BatchingOptions {
  /** Rows of the global batch, over all processes. */
  readonly batchSize: number
  /** Tokens per row (T); each row reads T+1 tokens, the last only as a target. */
  readonly maxLength: number
  /** "padding" (one document per row, the original) by default. */
  readonly mode?: BatchMode
  /** Seed of the per-epoch document order (default 42, as the original). */
  readonly seed?: number
  /** Visit documents in file order instead (default true: shuffled). */
  readonly shuffle?: boolean
  readonly processIndex?: number
  readonly processCount?: number
  /** The token written where a row has no document left (its mask is 0, its target ignored). */
  readonly padTokenId: number
  /**
   * When a padded document is truncated and ends with this token, the token is kept as the last
   * one, as a Hugging Face tokenizer with `add_eos_token` truncates (special tokens go on after).
   */
  readonly eosTokenId?: number
  /** Padding mode: stop after this many epochs (default: never stop). */
  readonly epochs?: number
}

export interface BatchPlan {
  readonly mode: BatchMode
  readonly batchSize: number
  readonly maxLength: number
  readonly seed: number
  readonly shuffle: boolean
  readonly documents: number
  /** Documents per lane per epoch, floor(documents / batchSize); in padding mode the steps per epoch. */
  readonly docsPerLane: number
  readonly processIndex: number
  readonly processCount: number
  /** This process's lanes: [firstRow, firstRow + rows). */
  readonly firstRow: number
  readonly rows: number
  readonly padTokenId: number
  readonly eosTokenId: number | undefined
  readonly epochs: number | undefined
  /** The document order of an epoch (the last two are cached). */
  readonly order: (epoch: number) => Uint32Array
}

const isCount = (n: number) => Number.isSafeInteger(n) && n >= 1

/** Checks the options against the dataset; throws the typed error (see `makeBatchPlan`). */
export const batchPlanSync = (documents: number, options: BatchingOptions): BatchPlan => {
  const fail = (option: string, value: number, reason: string) => {
    throw new BatchingOptionsInvalid({ option, value, reason })
  }
  const B = options.batchSize
  const T = options.maxLength
  const P = options.processCount ?? 1
  const i = options.processIndex ?? 0
  if (!isCount(B)) fail("batchSize", B, "it must be a positive integer")
  if (!isCount(T)) fail("maxLength", T, "it must be a positive integer")
  if (!isCount(P)) fail("processCount", P, "it must be a positive integer")
  if (!Number.isSafeInteger(i) || i < 0 || i >= P)
    fail("processIndex", i, `it must be an integer in [0, ${P}) for ${P} processes`)
  if (B % P !== 0)
    fail("batchSize", B, `it must divide evenly over ${P} processes (each builds batchSize / ${P} rows)`)
  if (!Number.isInteger(options.padTokenId) || options.padTokenId < 0)
    fail("padTokenId", options.padTokenId, "it must be a token id (set the tokenizer's pad or eos token)")
  if (options.epochs !== undefined && !isCount(options.epochs))
    fail("epochs", options.epochs, "it must be a positive integer")
  // A packed lane runs into the next epoch on its own schedule, so no step ends every lane's epoch.
  if (options.epochs !== undefined && options.mode === "packing")
    fail(
      "epochs",
      options.epochs,
      "packing streams run on across epochs: stop after a number of steps instead",
    )
  const seed = options.seed ?? 42
  if (!Number.isSafeInteger(seed)) fail("seed", seed, "it must be an integer")
  if (documents < B) throw new DatasetTooSmall({ documents, batchSize: B })
  const shuffle = options.shuffle ?? true
  const cache = new Map<number, Uint32Array>()
  const order = (epoch: number) => {
    let o = cache.get(epoch)
    if (o === undefined) {
      o = epochPermutation(seed, epoch, documents, shuffle)
      cache.set(epoch, o)
      // Lanes of one group are at most an epoch apart; a third epoch means the oldest is done.
      if (cache.size > 2) cache.delete(Math.min(...cache.keys()))
    }
    return o
  }
  const rows = B / P
  return {
    mode: options.mode ?? "padding",
    batchSize: B,
    maxLength: T,
    seed,
    shuffle,
    documents,
    docsPerLane: Math.floor(documents / B),
    processIndex: i,
    processCount: P,
    firstRow: i * rows,
    rows,
    padTokenId: options.padTokenId,
    eosTokenId: options.eosTokenId,
    epochs: options.epochs,
    order,
  }
}

export const makeBatchPlan = (
  documents: number,
  options: BatchingOptions,
): Effect.Effect<BatchPlan, BatchingOptionsInvalid | DatasetTooSmall> =>
  attemptSync(
    () => batchPlanSync(documents, options),
    (e): e is BatchingOptionsInvalid | DatasetTooSmall =>
      e instanceof BatchingOptionsInvalid || e instanceof DatasetTooSmall,
  )
