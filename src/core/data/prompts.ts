/**
 * Prompts into generation batches, as the original generate.py tokenizes them: padding on the
 * LEFT (so every prompt ends at the last column and generation appends to all rows alike), to the
 * longest prompt of the batch rounded up to `padToMultipleOf`, each prompt truncated to
 * `maxLength` tokens. A short last batch is filled with placeholder rows (the original fills it
 * with the prompt "EMPTY"), so every batch has the same number of rows.
 */
import { BatchingOptionsInvalid } from "./errors.ts"

export interface PromptBatchOptions {
  readonly batchSize: number
  /** Prompts longer than this many tokens are truncated. */
  readonly maxLength: number
  /** Round the batch's length up to a multiple of this (generate.py: 64); 1 by default. */
  readonly padToMultipleOf?: number
  readonly padTokenId: number
  /**
   * A row must hold at least one real token (a fully masked row has nothing to attend to): empty
   * prompts and placeholder rows get this one token, e.g. BOS. Defaults to padTokenId.
   */
  readonly fillTokenId?: number
  /** Which end of a long prompt is cut: "right" (the Hugging Face default) keeps its start. */
  readonly truncationSide?: "left" | "right"
  /**
   * Group prompts of similar length into a batch (less padding, fewer distinct shapes); outputs
   * go back to input order through `indices`. Off by default: batches follow the input order.
   */
  readonly sortByLength?: boolean
}

/** One batch, row-major [batchSize, length]; shaped as `PromptBatch` of core/generate.ts. */
export interface GenerationBatch {
  readonly batchSize: number
  readonly length: number
  readonly inputIds: Int32Array
  /** 1 on prompt tokens, 0 on the left padding. */
  readonly attentionMask: Uint8Array
  /** cumsum(mask) - 1 on prompt tokens, 0 on padding: what generate() feeds as position ids. */
  readonly positions: Int32Array
  /** For each row, the index of its prompt in the input, or -1 for a placeholder row. */
  readonly indices: Int32Array
  /** Rows that hold a prompt (the others are placeholders). */
  readonly prompts: number
}

const check = (option: string, value: number, ok: boolean, reason: string) => {
  if (!ok) throw new BatchingOptionsInvalid({ option, value, reason })
}

/** Throws BatchingOptionsInvalid for options that cannot work. */
export const promptBatches = (
  prompts: ReadonlyArray<ArrayLike<number>>,
  options: PromptBatchOptions,
): ReadonlyArray<GenerationBatch> => {
  const { batchSize: B, maxLength } = options
  const multiple = options.padToMultipleOf ?? 1
  check("batchSize", B, Number.isSafeInteger(B) && B >= 1, "it must be a positive integer")
  check(
    "maxLength",
    maxLength,
    Number.isSafeInteger(maxLength) && maxLength >= 1,
    "it must be a positive integer",
  )
  check(
    "padToMultipleOf",
    multiple,
    Number.isSafeInteger(multiple) && multiple >= 1,
    "it must be a positive integer",
  )
  const fill = options.fillTokenId ?? options.padTokenId
  const left = options.truncationSide === "left"
  const cut = (p: ArrayLike<number>): ArrayLike<number> => {
    const ids = Array.from(p)
    if (ids.length > maxLength) return left ? ids.slice(ids.length - maxLength) : ids.slice(0, maxLength)
    return ids.length === 0 ? [fill] : ids
  }
  const rows = prompts.map((p, index) => ({ index, ids: cut(p) }))
  // A stable sort, longest first, so the first batch shows the memory a run needs.
  if (options.sortByLength) rows.sort((a, b) => b.ids.length - a.ids.length || a.index - b.index)
  const out: GenerationBatch[] = []
  for (let start = 0; start < rows.length; start += B) {
    const group = rows.slice(start, start + B)
    const longest = Math.max(...group.map((r) => r.ids.length))
    const L = Math.ceil(longest / multiple) * multiple
    const inputIds = new Int32Array(B * L).fill(options.padTokenId)
    const attentionMask = new Uint8Array(B * L)
    const positions = new Int32Array(B * L)
    const indices = new Int32Array(B).fill(-1)
    for (let r = 0; r < B; r++) {
      const row = group[r]
      const ids = row?.ids ?? [fill]
      if (row !== undefined) indices[r] = row.index
      const pad = L - ids.length
      for (let t = 0; t < ids.length; t++) {
        inputIds[r * L + pad + t] = ids[t]!
        attentionMask[r * L + pad + t] = 1
        positions[r * L + pad + t] = t
      }
    }
    out.push({ batchSize: B, length: L, inputIds, attentionMask, positions, indices, prompts: group.length })
  }
  return out
}

/** Outputs per batch row back in prompt order (placeholder rows dropped). */
export const inInputOrder = <A>(
  batches: ReadonlyArray<GenerationBatch>,
  outputs: ReadonlyArray<ReadonlyArray<A>>,
): ReadonlyArray<A> => {
  const total = batches.reduce((n, b) => n + b.prompts, 0)
  const result = new Array<A>(total)
  batches.forEach((b, i) => {
    b.indices.forEach((index, r) => {
      if (index >= 0) result[index] = outputs[i]![r]!
    })
  })
  return result
}
