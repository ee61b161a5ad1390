/**
 * Batching as pure code: shapes and shifts of both modes, the seeded epoch order, the dropped last
 * batch, each process's share of the global batch, and resuming from a saved position.
 */
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import {
  type BatchingOptions,
  batchIterator,
  batchPlanSync,
  type DataPosition,
  IGNORE_INDEX,
  makeBatchPlan,
  mergeDataPositions,
  type TrainBatch,
} from "../../src/core/data/batching.ts"
import { epochPermutation } from "../../src/core/data/shuffle.ts"

const EOS = 2
const PAD = 0
/** Document i: 1 + (7i mod 13) tokens 1000·i + t, the last one EOS. */
const makeDocs = (n: number): number[][] =>
  Array.from({ length: n }, (_, i) => {
    const len = 1 + ((7 * i) % 13)
    return Array.from({ length: len }, (_, t) => (t === len - 1 ? EOS : 1000 * i + t + 3))
  })

const base = (over: Partial<BatchingOptions> = {}): BatchingOptions => ({
  batchSize: 4,
  maxLength: 8,
  padTokenId: PAD,
  eosTokenId: EOS,
  seed: 42,
  ...over,
})

/** The first `count` batches (fewer if the iterator ends), and the documents it asked for. */
const take = (docs: number[][], options: BatchingOptions, count: number, start?: DataPosition) => {
  const plan = batchPlanSync(docs.length, options)
  const asked: number[] = []
  const it = batchIterator(
    plan,
    (d) => {
      asked.push(d)
      return docs[d]!
    },
    start,
  )
  const batches: TrainBatch[] = []
  for (let k = 0; k < count; k++) {
    const b = it.next()
    if (b === undefined) break
    batches.push(b)
  }
  return { plan, batches, asked }
}

const rowOf = (b: TrainBatch, r: number, key: "inputIds" | "targets" | "positions" | "attentionMask") =>
  Array.from(b[key].subarray(r * b.length, (r + 1) * b.length))

/** A batch without its position, for comparing batches of runs resumed at different places. */
const content = (b: TrainBatch) => ({
  inputIds: Array.from(b.inputIds),
  targets: Array.from(b.targets),
  positions: Array.from(b.positions),
  attentionMask: Array.from(b.attentionMask),
  tokens: b.tokens,
  step: b.step,
  epoch: b.epoch,
})

describe("the epoch order", () => {
  it("is a seeded permutation, the same on every machine for the same seed and epoch", () => {
    // A golden value: changing it reorders every resumed run.
    expect(Array.from(epochPermutation(42, 0, 10))).toEqual([6, 0, 1, 9, 5, 2, 3, 4, 8, 7])
    expect(Array.from(epochPermutation(42, 1, 10))).toEqual([0, 1, 2, 7, 9, 8, 4, 5, 6, 3])
    const p = epochPermutation(3, 5, 1000)
    expect([...p].sort((a, b) => a - b)).toEqual(Array.from({ length: 1000 }, (_, i) => i))
    expect(Array.from(epochPermutation(3, 5, 1000))).toEqual(Array.from(p))
    expect(Array.from(epochPermutation(3, 6, 1000))).not.toEqual(Array.from(p))
    expect(Array.from(epochPermutation(3, 5, 10, false))).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
  })
})

describe("padding mode", () => {
  it("puts document order[s·B + b] in row b, truncated to maxLength+1 tokens, right-padded and shifted", () => {
    const docs = makeDocs(10)
    const { plan, batches } = take(docs, base(), 4)
    expect(plan.docsPerLane).toBe(2) // 10 // 4: the incomplete last batch is dropped
    const T = 8
    for (const b of batches) {
      expect(b.batchSize).toBe(4)
      expect(b.length).toBe(T)
      expect(b.inputIds.length).toBe(4 * T)
      const order = epochPermutation(42, b.epoch, 10)
      let counted = 0
      for (let r = 0; r < 4; r++) {
        const doc = docs[order[b.stepInEpoch * 4 + r]!]!
        // Truncated to T+1, keeping the final EOS as a Hugging Face tokenizer with add_eos_token does.
        const seq = doc.length > T + 1 ? [...doc.slice(0, T), EOS] : doc
        const n = seq.length
        expect(rowOf(b, r, "inputIds")).toEqual(Array.from({ length: T }, (_, t) => (t < n ? seq[t]! : PAD)))
        expect(rowOf(b, r, "targets")).toEqual(
          Array.from({ length: T }, (_, t) => (t + 1 < n ? seq[t + 1]! : IGNORE_INDEX)),
        )
        expect(rowOf(b, r, "attentionMask")).toEqual(Array.from({ length: T }, (_, t) => (t < n ? 1 : 0)))
        expect(rowOf(b, r, "positions")).toEqual(Array.from({ length: T }, (_, t) => (t < n ? t : 0)))
        counted += Math.max(0, Math.min(n, T + 1) - 1)
      }
      expect(b.tokens).toBe(counted)
      expect(b.tokens).toBe(Array.from(b.targets).filter((t) => t !== IGNORE_INDEX).length)
    }
    expect(batches.map((b) => [b.epoch, b.stepInEpoch, b.step])).toEqual([
      [0, 0, 0],
      [0, 1, 1],
      [1, 0, 2],
      [1, 1, 3],
    ])
  })

  it("visits each epoch in a new order and stops after `epochs`", () => {
    const docs = makeDocs(9)
    const { batches, asked } = take(docs, base({ epochs: 3 }), 100)
    expect(batches.length).toBe(6)
    for (let e = 0; e < 3; e++) {
      const seen = asked.slice(e * 8, (e + 1) * 8)
      expect(seen).toEqual(Array.from(epochPermutation(42, e, 9).slice(0, 8)))
    }
  })

  it("reads documents in file order without shuffle", () => {
    const { asked } = take(makeDocs(8), base({ shuffle: false }), 2)
    expect(asked).toEqual([0, 1, 2, 3, 4, 5, 6, 7])
  })
})

describe("packing mode", () => {
  it("cuts each lane's stream of documents into rows of maxLength+1 tokens sharing one token", () => {
    const docs = makeDocs(40)
    const B = 4
    const T = 8
    const { plan, batches } = take(docs, base({ mode: "packing" }), 12)
    // Lane b's stream: documents order_e[j·B + b] for j = 0..docsPerLane-1, epoch after epoch.
    const stream = (lane: number) => {
      const out: number[] = []
      for (let e = 0; e < 3; e++) {
        const order = epochPermutation(42, e, docs.length)
        for (let j = 0; j < plan.docsPerLane; j++) out.push(...docs[order[j * B + lane]!]!)
      }
      return out
    }
    for (let lane = 0; lane < B; lane++) {
      const s = stream(lane)
      batches.forEach((b, k) => {
        expect(rowOf(b, lane, "inputIds")).toEqual(s.slice(k * T, k * T + T))
        expect(rowOf(b, lane, "targets")).toEqual(s.slice(k * T + 1, k * T + T + 1))
        expect(rowOf(b, lane, "positions")).toEqual([0, 1, 2, 3, 4, 5, 6, 7])
        expect(rowOf(b, lane, "attentionMask")).toEqual([1, 1, 1, 1, 1, 1, 1, 1])
      })
    }
    for (const b of batches) expect(b.tokens).toBe(B * T)
  })

  it("continues into the next epoch's documents when a lane runs out", () => {
    // 8 documents, 4 lanes: 2 documents per lane per epoch, so rows soon span epochs.
    const { batches } = take(makeDocs(8), base({ mode: "packing" }), 10)
    expect(batches.length).toBe(10)
    expect(Math.max(...batches.at(-1)!.position.lanes.map((c) => c.epoch))).toBeGreaterThan(1)
  })
})

describe("processes", () => {
  for (const mode of ["padding", "packing"] as const)
    it(`each builds its rows of the global batch, reading only its lanes' documents (${mode})`, () => {
      const docs = makeDocs(50)
      const whole = take(docs, base({ mode, batchSize: 8 }), 6)
      for (const P of [2, 4]) {
        const parts = Array.from({ length: P }, (_, i) =>
          take(docs, base({ mode, batchSize: 8, processCount: P, processIndex: i }), 6),
        )
        whole.batches.forEach((b, k) => {
          const rows = parts.map((p) => p.batches[k]!)
          rows.forEach((r, i) => {
            expect(r.batchSize).toBe(8 / P)
            expect(r.firstRow).toBe((i * 8) / P)
            expect(r.globalBatchSize).toBe(8)
          })
          for (const key of ["inputIds", "targets", "positions", "attentionMask"] as const)
            expect(rows.flatMap((r) => Array.from(r[key]))).toEqual(Array.from(b[key]))
          expect(rows.reduce((n, r) => n + r.tokens, 0)).toBe(b.tokens)
        })
        parts.forEach((p, i) => {
          const lanes = new Set(Array.from({ length: 8 / P }, (_, k) => (i * 8) / P + k))
          const mine = new Set<number>()
          for (let e = 0; e < 4; e++) {
            const order = epochPermutation(42, e, 50)
            order.forEach((d, j) => {
              if (lanes.has(j % 8) && j < 48) mine.add(d)
            })
          }
          for (const d of p.asked) expect(mine.has(d)).toBe(true)
        })
      }
    })
})

describe("resuming", () => {
  const roundTrip = (p: DataPosition): DataPosition => JSON.parse(JSON.stringify(p))

  for (const mode of ["padding", "packing"] as const)
    it(`batches k.. from the position saved after k batches equal an uninterrupted run's (${mode})`, () => {
      const docs = makeDocs(30)
      const options = base({ mode, batchSize: 4, maxLength: 6 })
      const straight = take(docs, options, 20).batches
      for (const k of [1, 3, 7, 8, 15]) {
        const saved = roundTrip(straight[k - 1]!.position)
        const resumed = take(docs, options, 20 - k, saved).batches
        expect(resumed.map(content)).toEqual(straight.slice(k).map(content))
        expect(resumed.at(-1)!.position).toEqual(straight.at(-1)!.position)
      }
    })

  it("resumes a two-process run on one process from the merged positions (packing)", () => {
    const docs = makeDocs(30)
    const options = base({ mode: "packing", batchSize: 4, maxLength: 6 })
    const straight = take(docs, options, 12).batches
    const halves = [0, 1].map((i) => take(docs, { ...options, processCount: 2, processIndex: i }, 5).batches)
    const merged = mergeDataPositions(halves.map((h) => h.at(-1)!.position))
    expect(merged).toEqual(straight[4]!.position)
    const resumed = take(docs, options, 7, roundTrip(merged)).batches
    expect(resumed.map(content)).toEqual(straight.slice(5).map(content))
    // One process's own position lacks the other's lanes: a typed error that says to merge.
    expect(() => take(docs, options, 1, halves[0]!.at(-1)!.position)).toThrow(/mergeDataPositions/)
  })

  it("refuses a position saved with another seed, batch shape or dataset", () => {
    const docs = makeDocs(30)
    const saved = take(docs, base(), 3).batches[2]!.position
    expect(() => take(docs, base({ seed: 1 }), 1, saved)).toThrow(/seed was 42, is now 1/)
    expect(() => take(docs, base({ maxLength: 16 }), 1, saved)).toThrow(/maxLength/)
    expect(() => take(makeDocs(31), base(), 1, saved)).toThrow(/documents was 30, is now 31/)
    expect(() => take(docs, base({ mode: "packing" }), 1, saved)).toThrow(/mode was padding/)
  })
})

describe("batching options", () => {
  const errorOf = (documents: number, options: BatchingOptions) =>
    Effect.runSync(Effect.flip(makeBatchPlan(documents, options)))

  it("are checked with typed errors that name the option and the fix", () => {
    const e = errorOf(100, base({ batchSize: 6, processCount: 4 }))
    expect(e._tag).toBe("BatchingOptionsInvalid")
    expect(e.message).toContain("divide evenly over 4 processes")
    expect(errorOf(100, base({ maxLength: 0 }))._tag).toBe("BatchingOptionsInvalid")
    expect(errorOf(100, base({ processIndex: 2, processCount: 2 })).message).toContain("processIndex")
    expect(errorOf(100, base({ mode: "packing", epochs: 2 })).message).toContain("number of steps")
    const small = errorOf(3, base())
    expect(small._tag).toBe("DatasetTooSmall")
    expect(small.message).toContain("fewer than the batch size 4")
  })
})
