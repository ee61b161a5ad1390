/**
 * The static memory planner behind graph capture: buffers whose lifetimes overlap never share a
 * byte, each device's block is at least the peak of live bytes and, on a step-shaped sequence
 * (activations kept through a forward pass and freed in reverse by the backward), exactly it.
 */
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { type Lifetime, planMemory, peakLive as plannerPeak } from "../../src/core/memoryPlan.ts"

const round = (n: number) => Math.ceil(Math.max(n, 1) / 256) * 256

/** The most bytes (rounded as the planner does) live at once on `device`. */
const peakLive = (bs: ReadonlyArray<Lifetime>, device: number) => {
  let peak = 0
  for (const b of bs) {
    if (b.device !== device) continue
    const live = bs
      .filter((o) => o.device === device && o.start <= b.start && b.start < o.end)
      .reduce((a, o) => a + round(o.bytes), 0)
    peak = Math.max(peak, live)
  }
  return peak
}

const lifetimes = fc
  .array(
    fc.record({
      device: fc.integer({ min: 0, max: 1 }),
      bytes: fc.integer({ min: 0, max: 5000 }),
      start: fc.integer({ min: 0, max: 60 }),
      length: fc.integer({ min: 1, max: 30 }),
    }),
    { maxLength: 60 },
  )
  .map((xs) =>
    xs.map((x, key) => ({ key, device: x.device, bytes: x.bytes, start: x.start, end: x.start + x.length })),
  )

describe("memory planning", () => {
  it("never lets buffers that are live together share bytes, and each block holds its peak", () => {
    fc.assert(
      fc.property(lifetimes, (bs) => {
        const plan = planMemory(bs)
        for (const a of bs) {
          const at = plan.offsets.get(a.key)!
          expect(at % 256).toBe(0)
          expect(at + round(a.bytes)).toBeLessThanOrEqual(plan.blockBytes.get(a.device)!)
          for (const b of bs) {
            if (b.key <= a.key || b.device !== a.device || !(a.start < b.end && b.start < a.end)) continue
            const bt = plan.offsets.get(b.key)!
            expect(at + round(a.bytes) <= bt || bt + round(b.bytes) <= at).toBe(true)
          }
        }
        for (const [device, bytes] of plan.blockBytes) {
          expect(plannerPeak(bs).get(device)).toBe(peakLive(bs, device))
          expect(bytes).toBeGreaterThanOrEqual(peakLive(bs, device))
        }
      }),
      { numRuns: 300 },
    )
  })

  it("fits a forward/backward-shaped step in exactly its peak", () => {
    // 12 activations kept by the forward pass, each with a temporary freed at once; the backward
    // frees the activations in reverse while making gradients of other sizes.
    const bs: Lifetime[] = []
    let t = 0
    const acts: number[] = []
    for (let l = 0; l < 12; l++) {
      acts.push(bs.length)
      bs.push({ key: bs.length, device: 0, bytes: 4096 * (1 + (l % 3)), start: t++, end: -1 })
      bs.push({ key: bs.length, device: 0, bytes: 8192, start: t, end: t + 1 })
      t += 2
    }
    for (const a of acts.reverse()) {
      bs.push({ key: bs.length, device: 0, bytes: 2048, start: t, end: t + 2 })
      t += 1
      bs[a] = { ...bs[a]!, end: t++ }
    }
    const plan = planMemory(bs)
    expect(plan.blockBytes.get(0)).toBe(peakLive(bs, 0))
  })
})
