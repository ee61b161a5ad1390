/**
 * Token sequences into fixed-shape training batches, as plain host arrays.
 *
 * The global batch has `batchSize` rows ("lanes") of `maxLength` tokens. Documents are visited in
 * a seeded per-epoch order (shuffle.ts), and document `order[j·B + b]` belongs to lane `b`: the
 * original's `Batches` (row b of step s is document order[s·B + b], the incomplete last batch
 * dropped), extended so that packing needs no global knowledge either. Each process builds only
 * its own lanes, `[i·B/P, (i+1)·B/P)`, and so reads and tokenizes only the documents of those lanes.
 *
 * - padding: a lane's row at step s is one document, truncated to maxLength+1 tokens and
 *   right-padded, then shifted: inputs are tokens 0..T-1, targets tokens 1..T (the original's
 *   `max_length+1` tokenization and `input_ids[:, :-1]` / `input_ids[:, 1:]`).
 * - packing: a lane's documents are concatenated (each ends with its EOS) into one endless stream,
 *   continuing into the next epoch's documents for that lane, and row k is stream tokens
 *   [k·T, k·T + T]. Consecutive rows share one token, so every next-token pair of the stream is
 *   trained exactly once. Positions run 0..T-1 across document boundaries and attention is not
 *   masked at them: a document may attend to the end of the previous one, the usual trade of
 *   packing (no padding at all) against exact per-document attention.
 *
 * Tokens come in through a pull protocol (`LaneGroup.wants` / `supply` / `build`), so the same
 * code runs synchronously over an in-memory tokenizer in tests and asynchronously over files in
 * a worker thread, and the two give the same batches.
 */

import { LaneGroup, type StepRows } from "./lanes.ts"
import type { BatchPlan } from "./plan.ts"
import { type DataPosition, fingerprint } from "./position.ts"

export { type DocRequest, LaneGroup, type StepRows } from "./lanes.ts"
export {
  type BatchingOptions,
  type BatchMode,
  type BatchPlan,
  batchPlanSync,
  IGNORE_INDEX,
  makeBatchPlan,
} from "./plan.ts"
export {
  checkPosition,
  DataPosition,
  initialPosition,
  LaneCursor,
  mergeDataPositions,
} from "./position.ts"

/** A batch as host arrays, row-major [batchSize, length]; shaped as `HostTokenBatch`. */
export interface TrainBatch {
  /** Rows held by this process: batchSize / processCount. */
  readonly batchSize: number
  readonly length: number
  readonly globalBatchSize: number
  /** The global row index of this process's first row. */
  readonly firstRow: number
  readonly inputIds: Int32Array
  /** targets[b, t] is the token after inputIds[b, t]; IGNORE_INDEX where none or padding. */
  readonly targets: Int32Array
  readonly positions: Int32Array
  /** 1 where the input token is real. */
  readonly attentionMask: Uint8Array
  /** Targets counted by the loss (not IGNORE_INDEX) in this process's rows. */
  readonly tokens: number
  readonly epoch: number
  readonly stepInEpoch: number
  /** 0-based index of this batch since the start of training. */
  readonly step: number
  /** Resume here to continue with the batch after this one. */
  readonly position: DataPosition
}

// ---------------------------------------------------------------------------------------------
// Batches

/** The position after a batch whose rows are `parts` (all from one step). */
const positionAfter = (plan: BatchPlan, parts: ReadonlyArray<StepRows>): DataPosition => {
  const head = parts[0]!
  if (plan.mode === "padding") {
    const last = head.stepInEpoch + 1 >= plan.docsPerLane
    return {
      ...fingerprint(plan),
      steps: head.step + 1,
      epoch: last ? head.epoch + 1 : head.epoch,
      stepInEpoch: last ? 0 : head.stepInEpoch + 1,
      lanes: [],
    }
  }
  const lanes = parts.flatMap((p) => p.cursors).sort((a, b) => a.lane - b.lane)
  return {
    ...fingerprint(plan),
    steps: head.step + 1,
    epoch: Math.min(...lanes.map((c) => c.epoch)),
    stepInEpoch: 0,
    lanes,
  }
}

/** This process's batch from the rows of one step, built by one or several lane groups. */
export const assembleBatch = (plan: BatchPlan, parts: ReadonlyArray<StepRows>): TrainBatch => {
  const T = plan.maxLength
  const head = parts[0]
  if (head === undefined) throw new Error("assembleBatch: no rows")
  if (parts.length === 1 && head.lanes.length === plan.rows) {
    const { inputIds, targets, positions, attentionMask, tokens, epoch, stepInEpoch, step } = head
    return {
      batchSize: plan.rows,
      length: T,
      globalBatchSize: plan.batchSize,
      firstRow: plan.firstRow,
      inputIds,
      targets,
      positions,
      attentionMask,
      tokens,
      epoch,
      stepInEpoch,
      step,
      position: positionAfter(plan, parts),
    }
  }
  const n = plan.rows * T
  const out = {
    inputIds: new Int32Array(n),
    targets: new Int32Array(n),
    positions: new Int32Array(n),
    attentionMask: new Uint8Array(n),
  }
  let tokens = 0
  let rowsSeen = 0
  for (const part of parts) {
    if (part.step !== head.step) throw new Error(`assembleBatch: rows of steps ${head.step} and ${part.step}`)
    tokens += part.tokens
    part.lanes.forEach((lane, k) => {
      const dst = (lane - plan.firstRow) * T
      const src = k * T
      out.inputIds.set(part.inputIds.subarray(src, src + T), dst)
      out.targets.set(part.targets.subarray(src, src + T), dst)
      out.positions.set(part.positions.subarray(src, src + T), dst)
      out.attentionMask.set(part.attentionMask.subarray(src, src + T), dst)
      rowsSeen++
    })
  }
  if (rowsSeen !== plan.rows) throw new Error(`assembleBatch: ${rowsSeen} rows for ${plan.rows} lanes`)
  return {
    batchSize: plan.rows,
    length: T,
    globalBatchSize: plan.batchSize,
    firstRow: plan.firstRow,
    ...out,
    tokens,
    epoch: Math.min(...parts.map((p) => p.epoch)),
    stepInEpoch: head.stepInEpoch,
    step: head.step,
    position: positionAfter(plan, parts),
  }
}

/** Splits this process's lanes over `groups` lane groups (round robin, so each gets a spread). */
export const splitLanes = (plan: BatchPlan, groups: number): ReadonlyArray<ReadonlyArray<number>> => {
  const out: number[][] = Array.from({ length: Math.max(1, Math.min(groups, plan.rows)) }, () => [])
  for (let k = 0; k < plan.rows; k++) out[k % out.length]!.push(plan.firstRow + k)
  return out
}

/**
 * Batches on the calling thread from a synchronous tokenizer: the reference the worker pool is
 * tested against, and enough for small in-memory datasets.
 */
export const batchIterator = (
  plan: BatchPlan,
  tokensOf: (doc: number) => ArrayLike<number>,
  start?: DataPosition,
): { readonly next: () => TrainBatch | undefined } => {
  const group = new LaneGroup(plan, splitLanes(plan, 1)[0]!, start)
  return {
    next: () => {
      if (group.done) return undefined
      for (let w = group.wants(); w.length > 0; w = group.wants())
        for (const r of w) group.supply(r, tokensOf(r.doc))
      return assembleBatch(plan, [group.build()])
    },
  }
}
