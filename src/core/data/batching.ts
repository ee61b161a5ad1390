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
import { type Effect, Schema } from "effect"
import { attemptSync, BatchingOptionsInvalid, DataPositionMismatch, DatasetTooSmall } from "./errors.ts"
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

/** Where lane `lane` resumes: token `offset` of its `index`-th document of `epoch`. */
export const LaneCursor = Schema.Struct({
  lane: Schema.Number,
  epoch: Schema.Number,
  index: Schema.Number,
  offset: Schema.Number,
})
export type LaneCursor = typeof LaneCursor.Type

/**
 * Where the data stands after a batch, as JSON-able data for a checkpoint manifest. The setup
 * fields make a position from another dataset or batch shape a typed error rather than a silent
 * change of order.
 */
export const DataPosition = Schema.Struct({
  mode: Schema.Literals(["padding", "packing"]),
  seed: Schema.Number,
  shuffle: Schema.Boolean,
  documents: Schema.Number,
  batchSize: Schema.Number,
  maxLength: Schema.Number,
  /** Batches produced since the start of training. */
  steps: Schema.Number,
  /** Padding: the epoch of the next batch. Packing: the lowest epoch any lane held here is in. */
  epoch: Schema.Number,
  /** Padding: the index of the next batch within its epoch. Packing: 0. */
  stepInEpoch: Schema.Number,
  /** Packing: one cursor per lane (only this process's lanes, see `mergeDataPositions`). */
  lanes: Schema.Array(LaneCursor),
})
export type DataPosition = typeof DataPosition.Type

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
// The plan: everything derived from the options and the number of documents

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

/** The position before the first batch. */
export const initialPosition = (plan: BatchPlan): DataPosition => ({
  ...fingerprint(plan),
  steps: 0,
  epoch: 0,
  stepInEpoch: 0,
  lanes:
    plan.mode === "packing"
      ? Array.from({ length: plan.batchSize }, (_, lane) => ({ lane, epoch: 0, index: 0, offset: 0 }))
      : [],
})

const fingerprint = (plan: BatchPlan) => ({
  mode: plan.mode,
  seed: plan.seed,
  shuffle: plan.shuffle,
  documents: plan.documents,
  batchSize: plan.batchSize,
  maxLength: plan.maxLength,
})

/** Checks that `position` was saved by a run with this plan and holds every lane in `lanes`. */
export const checkPosition = (
  plan: BatchPlan,
  position: DataPosition,
  lanes: ReadonlyArray<number>,
): void => {
  const expected = fingerprint(plan)
  const differ = (Object.keys(expected) as Array<keyof typeof expected>)
    .filter((k) => expected[k] !== position[k])
    .map((k) => `${k} was ${position[k]}, is now ${expected[k]}`)
  if (differ.length > 0) throw new DataPositionMismatch({ detail: differ.join("; ") })
  if (plan.mode === "padding") {
    if (position.stepInEpoch >= plan.docsPerLane || position.stepInEpoch < 0)
      throw new DataPositionMismatch({
        detail: `step ${position.stepInEpoch} of an epoch of ${plan.docsPerLane} steps`,
      })
    return
  }
  const held = new Map(position.lanes.map((c) => [c.lane, c]))
  const missing = lanes.filter((l) => !held.has(l))
  if (missing.length > 0)
    throw new DataPositionMismatch({
      detail:
        `it holds no cursor for lane(s) ${missing.slice(0, 8).join(", ")}${missing.length > 8 ? ", ..." : ""} ` +
        "(with several processes, merge their positions with mergeDataPositions before saving)",
    })
  for (const l of lanes) {
    const c = held.get(l)!
    if (c.index < 0 || c.index >= plan.docsPerLane || c.offset < 0 || c.epoch < 0)
      throw new DataPositionMismatch({ detail: `lane ${l} is at an impossible place (${JSON.stringify(c)})` })
  }
}

/** Combines the positions saved by each process (same batch) into one that holds every lane. */
export const mergeDataPositions = (parts: ReadonlyArray<DataPosition>): DataPosition => {
  const first = parts[0]
  if (first === undefined) throw new DataPositionMismatch({ detail: "no positions to merge" })
  const lanes = new Map<number, LaneCursor>()
  for (const p of parts) {
    for (const k of ["mode", "seed", "shuffle", "documents", "batchSize", "maxLength", "steps"] as const)
      if (p[k] !== first[k])
        throw new DataPositionMismatch({
          detail: `the positions to merge differ in ${k} (${first[k]} and ${p[k]})`,
        })
    for (const c of p.lanes) {
      const seen = lanes.get(c.lane)
      if (seen !== undefined && JSON.stringify(seen) !== JSON.stringify(c))
        throw new DataPositionMismatch({ detail: `two positions disagree on lane ${c.lane}` })
      lanes.set(c.lane, c)
    }
  }
  const merged = [...lanes.values()].sort((a, b) => a.lane - b.lane)
  return {
    ...first,
    epoch: merged.length > 0 ? Math.min(...merged.map((c) => c.epoch)) : first.epoch,
    lanes: merged,
  }
}

// ---------------------------------------------------------------------------------------------
// Lanes

/** A document a lane group needs: the `index`-th document of `lane` in `epoch`, i.e. `doc`. */
export interface DocRequest {
  readonly lane: number
  readonly epoch: number
  readonly index: number
  readonly doc: number
}

/** One step's rows of some lanes, in ascending lane order; its buffers can be transferred. */
export interface StepRows {
  readonly lanes: ReadonlyArray<number>
  readonly length: number
  readonly inputIds: Int32Array
  readonly targets: Int32Array
  readonly positions: Int32Array
  readonly attentionMask: Uint8Array
  readonly tokens: number
  /** Of this batch. */
  readonly epoch: number
  readonly stepInEpoch: number
  readonly step: number
  /** Packing: the cursors of these lanes after this batch. */
  readonly cursors: ReadonlyArray<LaneCursor>
}

interface Buffered {
  readonly epoch: number
  readonly index: number
  readonly tokens: ArrayLike<number>
}

interface PackLane {
  readonly lane: number
  /** Documents from the cursor on; the cursor is token `offset` of docs[0]. */
  docs: Buffered[]
  offset: number
  /** The next document to ask for. */
  next: { epoch: number; index: number }
  /** Asked for and not yet supplied, in order. */
  pending: DocRequest[]
  /** Tokens and documents seen, to guess how many documents a row needs. */
  seenTokens: number
  seenDocs: number
  /** After a restore, the offset still to be checked against the first document supplied. */
  restored: boolean
}

/** Most documents one lane asks for at once, whatever their guessed length. */
const MAX_LOOKAHEAD = 256

/**
 * The rows of some lanes (a process's, or a worker's share of them), step after step. Call
 * `wants()`, `supply` each request in order, repeat until `wants()` is empty, then `build()`.
 */
export class LaneGroup {
  readonly lanes: ReadonlyArray<number>
  private readonly plan: BatchPlan
  private epoch: number
  private stepInEpoch: number
  private steps: number
  /** Padding: this step's documents by lane. */
  private readonly supplied = new Map<number, ArrayLike<number>>()
  private readonly asked = new Set<number>()
  private readonly pack: PackLane[] = []

  constructor(plan: BatchPlan, lanes: ReadonlyArray<number>, start?: DataPosition) {
    this.plan = plan
    this.lanes = [...lanes].sort((a, b) => a - b)
    for (const l of this.lanes)
      if (!Number.isInteger(l) || l < 0 || l >= plan.batchSize)
        throw new BatchingOptionsInvalid({
          option: "lane",
          value: l,
          reason: `lanes are 0..${plan.batchSize - 1}`,
        })
    const from = start ?? initialPosition(plan)
    checkPosition(plan, from, this.lanes)
    this.epoch = from.epoch
    this.stepInEpoch = from.stepInEpoch
    this.steps = from.steps
    if (plan.mode === "packing") {
      const cursors = new Map(from.lanes.map((c) => [c.lane, c]))
      for (const lane of this.lanes) {
        const c = cursors.get(lane)!
        this.pack.push({
          lane,
          docs: [],
          offset: c.offset,
          next: { epoch: c.epoch, index: c.index },
          pending: [],
          seenTokens: 0,
          seenDocs: 0,
          restored: true,
        })
      }
    }
  }

  /** Padding mode with `epochs` set: every epoch has been served. */
  get done(): boolean {
    return this.plan.mode === "padding" && this.plan.epochs !== undefined && this.epoch >= this.plan.epochs
  }

  private docOf(lane: number, epoch: number, index: number): number {
    return this.plan.order(epoch)[index * this.plan.batchSize + lane]!
  }

  /** The documents still needed before `build()`; ask again after supplying them. */
  wants(): ReadonlyArray<DocRequest> {
    if (this.done) return []
    const out: DocRequest[] = []
    if (this.plan.mode === "padding") {
      for (const lane of this.lanes)
        if (!this.supplied.has(lane) && !this.asked.has(lane)) {
          this.asked.add(lane)
          out.push({
            lane,
            epoch: this.epoch,
            index: this.stepInEpoch,
            doc: this.docOf(lane, this.epoch, this.stepInEpoch),
          })
        }
      return out
    }
    const need = this.plan.maxLength + 1
    for (const p of this.pack) {
      if (p.pending.length > 0) continue
      const short = need - available(p)
      if (short <= 0) continue
      // Ask for about as many documents as the row still needs, so a round trip usually suffices.
      const mean = p.seenDocs > 0 ? Math.max(1, p.seenTokens / p.seenDocs) : 0
      const count = mean > 0 ? Math.min(MAX_LOOKAHEAD, Math.ceil(short / mean) + 1) : 4
      for (let k = 0; k < count; k++) {
        const { epoch, index } = p.next
        const request = { lane: p.lane, epoch, index, doc: this.docOf(p.lane, epoch, index) }
        p.pending.push(request)
        out.push(request)
        p.next =
          index + 1 >= this.plan.docsPerLane ? { epoch: epoch + 1, index: 0 } : { epoch, index: index + 1 }
      }
    }
    return out
  }

  /** The tokens of a requested document (requests of one lane in the order they were made). */
  supply(request: DocRequest, tokens: ArrayLike<number>): void {
    if (this.plan.mode === "padding") {
      if (!this.asked.has(request.lane))
        throw new Error(`LaneGroup: lane ${request.lane} did not ask for a document`)
      this.asked.delete(request.lane)
      this.supplied.set(request.lane, tokens)
      return
    }
    const p = this.pack.find((q) => q.lane === request.lane)
    const expected = p?.pending[0]
    if (
      p === undefined ||
      expected === undefined ||
      expected.epoch !== request.epoch ||
      expected.index !== request.index
    )
      throw new Error(
        `LaneGroup: document ${request.index} of lane ${request.lane} was not the one asked for next`,
      )
    p.pending.shift()
    p.seenTokens += tokens.length
    p.seenDocs++
    if (p.restored) {
      // The saved cursor points into this document; the same tokenizer must give it as many tokens.
      p.restored = false
      if (p.offset > 0 && p.offset >= tokens.length)
        throw new DataPositionMismatch({
          detail:
            `lane ${p.lane} resumes at token ${p.offset} of document ${request.doc}, which now has ` +
            `${tokens.length} tokens (was the tokenizer or the dataset changed?)`,
        })
    }
    if (tokens.length === 0) return
    p.docs.push({ epoch: request.epoch, index: request.index, tokens })
  }

  /** Builds this step's rows; every request of `wants()` must have been supplied. */
  build(): StepRows {
    const { maxLength: T } = this.plan
    const n = this.lanes.length
    const rows = {
      inputIds: new Int32Array(n * T),
      targets: new Int32Array(n * T),
      positions: new Int32Array(n * T),
      attentionMask: new Uint8Array(n * T),
    }
    const epoch = this.epoch
    const stepInEpoch = this.stepInEpoch
    const step = this.steps
    let tokens = 0
    let cursors: LaneCursor[] = []
    if (this.plan.mode === "padding") {
      if (this.done) throw new Error("LaneGroup: every epoch has been served")
      this.lanes.forEach((lane, k) => {
        const doc = this.supplied.get(lane)
        if (doc === undefined) throw new Error(`LaneGroup: lane ${lane} has no document for this step`)
        tokens += writePaddedRow(rows, k, T, doc, this.plan.padTokenId, this.plan.eosTokenId)
      })
      this.supplied.clear()
      this.stepInEpoch++
      if (this.stepInEpoch >= this.plan.docsPerLane) {
        this.epoch++
        this.stepInEpoch = 0
      }
    } else {
      let lowest = Number.POSITIVE_INFINITY
      this.pack.forEach((p, k) => {
        if (available(p) < T + 1) throw new Error(`LaneGroup: lane ${p.lane} has too few tokens for a row`)
        lowest = Math.min(lowest, p.docs[0]!.epoch)
        tokens += writePackedRow(rows, k, T, p)
      })
      cursors = this.pack.map((p) => ({
        lane: p.lane,
        epoch: p.docs[0]!.epoch,
        index: p.docs[0]!.index,
        offset: p.offset,
      }))
      this.epoch = Math.min(...cursors.map((c) => c.epoch))
      return {
        lanes: this.lanes,
        length: T,
        ...rows,
        tokens,
        epoch: lowest,
        stepInEpoch: 0,
        step: this.steps++,
        cursors,
      }
    }
    this.steps++
    return { lanes: this.lanes, length: T, ...rows, tokens, epoch, stepInEpoch, step, cursors }
  }
}

const available = (p: PackLane): number => {
  let n = -p.offset
  for (const d of p.docs) n += d.tokens.length
  return n
}

interface RowArrays {
  readonly inputIds: Int32Array
  readonly targets: Int32Array
  readonly positions: Int32Array
  readonly attentionMask: Uint8Array
}

/** Row k from one document; returns the targets counted. */
const writePaddedRow = (
  rows: RowArrays,
  k: number,
  T: number,
  doc: ArrayLike<number>,
  pad: number,
  eos: number | undefined,
): number => {
  const limit = T + 1
  const truncated = doc.length > limit
  const n = truncated ? limit : doc.length
  const keepEos = truncated && eos !== undefined && doc[doc.length - 1] === eos
  const token = (i: number) => (keepEos && i === limit - 1 ? eos! : doc[i]!)
  const base = k * T
  for (let t = 0; t < T; t++) {
    if (t < n) {
      rows.inputIds[base + t] = token(t)
      rows.attentionMask[base + t] = 1
      rows.positions[base + t] = t
      rows.targets[base + t] = t + 1 < n ? token(t + 1) : IGNORE_INDEX
    } else {
      rows.inputIds[base + t] = pad
      rows.attentionMask[base + t] = 0
      rows.positions[base + t] = 0
      rows.targets[base + t] = IGNORE_INDEX
    }
  }
  return Math.max(0, n - 1)
}

/** Row k from the lane's next T+1 tokens, then moves the lane on by T; returns the targets counted. */
const writePackedRow = (rows: RowArrays, k: number, T: number, p: PackLane): number => {
  const base = k * T
  let d = 0
  let i = p.offset
  for (let t = 0; t <= T; t++) {
    while (i >= p.docs[d]!.tokens.length) {
      d++
      i = 0
    }
    const tok = p.docs[d]!.tokens[i++]!
    if (t < T) {
      rows.inputIds[base + t] = tok
      rows.positions[base + t] = t
      rows.attentionMask[base + t] = 1
    }
    if (t > 0) rows.targets[base + t - 1] = tok
  }
  // The row's last token starts the next row.
  let remaining = T
  while (remaining > 0) {
    const left = p.docs[0]!.tokens.length - p.offset
    if (left > remaining) {
      p.offset += remaining
      remaining = 0
    } else {
      remaining -= left
      p.docs.shift()
      p.offset = 0
    }
  }
  return T
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
