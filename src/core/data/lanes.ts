/**
 * Lanes: the rows of the global batch, each fed with its own documents (see batching.ts). A lane
 * group builds the rows of some lanes step after step through a pull protocol, so the same code
 * runs over an in-memory tokenizer and, asynchronously, over files in a worker thread.
 */
import { BatchingOptionsInvalid, DataPositionMismatch } from "./errors.ts"
import { type BatchPlan, IGNORE_INDEX } from "./plan.ts"
import { checkPosition, type DataPosition, initialPosition, type LaneCursor } from "./position.ts"

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
    const T = this.plan.maxLength
    const n = this.lanes.length
    const rows: RowArrays = {
      inputIds: new Int32Array(n * T),
      targets: new Int32Array(n * T),
      positions: new Int32Array(n * T),
      attentionMask: new Uint8Array(n * T),
    }
    const step = this.steps++
    return this.plan.mode === "padding" ? this.buildPadded(rows, step) : this.buildPacked(rows, step)
  }

  private buildPadded(rows: RowArrays, step: number): StepRows {
    const T = this.plan.maxLength
    if (this.done) throw new Error("LaneGroup: every epoch has been served")
    let tokens = 0
    this.lanes.forEach((lane, k) => {
      const doc = this.supplied.get(lane)
      if (doc === undefined) throw new Error(`LaneGroup: lane ${lane} has no document for this step`)
      tokens += writePaddedRow(rows, k, T, doc, this.plan.padTokenId, this.plan.eosTokenId)
    })
    this.supplied.clear()
    const { epoch, stepInEpoch } = this
    if (++this.stepInEpoch >= this.plan.docsPerLane) {
      this.epoch++
      this.stepInEpoch = 0
    }
    return { lanes: this.lanes, length: T, ...rows, tokens, epoch, stepInEpoch, step, cursors: [] }
  }

  private buildPacked(rows: RowArrays, step: number): StepRows {
    const T = this.plan.maxLength
    let epoch = Number.POSITIVE_INFINITY
    let tokens = 0
    this.pack.forEach((p, k) => {
      if (available(p) < T + 1) throw new Error(`LaneGroup: lane ${p.lane} has too few tokens for a row`)
      epoch = Math.min(epoch, p.docs[0]!.epoch)
      tokens += writePackedRow(rows, k, T, p)
    })
    const cursors = this.pack.map((p) => ({
      lane: p.lane,
      epoch: p.docs[0]!.epoch,
      index: p.docs[0]!.index,
      offset: p.offset,
    }))
    return { lanes: this.lanes, length: T, ...rows, tokens, epoch, stepInEpoch: 0, step, cursors }
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
