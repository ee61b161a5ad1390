/**
 * Generation inputs: left padding to the batch's longest prompt rounded up to padToMultipleOf,
 * truncation, the positions generate() uses, and the way back to input order.
 */
import { describe, expect, it } from "vitest"
import { inInputOrder, promptBatches } from "../../src/core/data/prompts.ts"

const PAD = 0
const BOS = 1

const row = (a: Int32Array | Uint8Array, r: number, L: number) => Array.from(a.subarray(r * L, (r + 1) * L))

describe("prompt batches", () => {
  it("pads on the left to a multiple, with mask and positions (cumsum(mask) - 1, 0 on padding)", () => {
    const prompts = [
      [BOS, 5, 6],
      [BOS, 7],
      [BOS, 8, 9, 10, 11],
    ]
    const [b, ...rest] = promptBatches(prompts, {
      batchSize: 3,
      maxLength: 16,
      padToMultipleOf: 4,
      padTokenId: PAD,
    })
    expect(rest).toEqual([])
    expect(b!.length).toBe(8)
    expect(row(b!.inputIds, 0, 8)).toEqual([0, 0, 0, 0, 0, BOS, 5, 6])
    expect(row(b!.inputIds, 1, 8)).toEqual([0, 0, 0, 0, 0, 0, BOS, 7])
    expect(row(b!.inputIds, 2, 8)).toEqual([0, 0, 0, BOS, 8, 9, 10, 11])
    expect(row(b!.attentionMask, 1, 8)).toEqual([0, 0, 0, 0, 0, 0, 1, 1])
    expect(row(b!.positions, 0, 8)).toEqual([0, 0, 0, 0, 0, 0, 1, 2])
    expect(row(b!.positions, 2, 8)).toEqual([0, 0, 0, 0, 1, 2, 3, 4])
    for (let r = 0; r < 3; r++) {
      const mask = row(b!.attentionMask, r, 8)
      let sum = 0
      const expected = mask.map((m) => {
        sum += m
        return m === 1 ? sum - 1 : 0
      })
      expect(row(b!.positions, r, 8)).toEqual(expected)
    }
    expect(Array.from(b!.indices)).toEqual([0, 1, 2])
  })

  it("truncates long prompts (keeping their start by default), and fills a short last batch", () => {
    const prompts = [Array.from({ length: 10 }, (_, i) => i + 10), [BOS, 3], [BOS, 4, 4]]
    const batches = promptBatches(prompts, { batchSize: 2, maxLength: 4, padTokenId: PAD, fillTokenId: BOS })
    expect(batches.length).toBe(2)
    expect(row(batches[0]!.inputIds, 0, 4)).toEqual([10, 11, 12, 13])
    expect(row(batches[0]!.inputIds, 1, 4)).toEqual([0, 0, BOS, 3])
    const last = batches[1]!
    expect(last.prompts).toBe(1)
    expect(Array.from(last.indices)).toEqual([2, -1])
    expect(last.length).toBe(3)
    // A placeholder row holds one real token, so no row is fully masked.
    expect(row(last.inputIds, 1, 3)).toEqual([0, 0, BOS])
    expect(row(last.attentionMask, 1, 3)).toEqual([0, 0, 1])
    const left = promptBatches([Array.from({ length: 10 }, (_, i) => i)], {
      batchSize: 1,
      maxLength: 4,
      padTokenId: PAD,
      truncationSide: "left",
    })
    expect(Array.from(left[0]!.inputIds)).toEqual([6, 7, 8, 9])
  })

  it("sorts by length when asked, and puts outputs back in input order", () => {
    const prompts = [[1], [1, 2, 3, 4], [1, 2], [1, 2, 3, 4, 5, 6], [1, 2, 3]]
    const batches = promptBatches(prompts, {
      batchSize: 2,
      maxLength: 8,
      padTokenId: PAD,
      sortByLength: true,
    })
    expect(batches.map((b) => Array.from(b.indices))).toEqual([
      [3, 1],
      [4, 2],
      [0, -1],
    ])
    expect(batches.map((b) => b.length)).toEqual([6, 3, 1])
    // "Generate" by echoing each row's prompt length.
    const outputs = batches.map((b) =>
      Array.from({ length: b.batchSize }, (_, r) =>
        row(b.attentionMask, r, b.length).reduce((a, m) => a + m, 0),
      ),
    )
    expect(inInputOrder(batches, outputs)).toEqual([1, 4, 2, 6, 3])
  })

  it("refuses options that cannot work", () => {
    expect(() => promptBatches([[1]], { batchSize: 0, maxLength: 4, padTokenId: 0 })).toThrow(/batchSize/)
    expect(() =>
      promptBatches([[1]], { batchSize: 1, maxLength: 4, padTokenId: 0, padToMultipleOf: 0 }),
    ).toThrow(/padToMultipleOf/)
  })
})
