/**
 * Static memory planning for a recorded step: every buffer the step allocates and frees is known
 * in advance with its size and the stretch of calls it lives for, so all of them can share one
 * block per device at planned offsets (XLA's buffer assignment; the "greedy by size" heuristic of
 * TFLite's arena planner). Two buffers share bytes only when their lifetimes do not overlap. The
 * block comes out close to the step's peak of live bytes, where a pool that only reuses freed
 * blocks of a matching size grows well past it.
 */

/** A buffer of the step: live from call `start` up to, not including, call `end`. */
export interface Lifetime {
  readonly key: number
  readonly device: number
  readonly bytes: number
  readonly start: number
  readonly end: number
}

export interface MemoryPlan {
  /** Byte offset of each buffer in its device's block. */
  readonly offsets: ReadonlyMap<number, number>
  /** Bytes of the block each device needs. */
  readonly blockBytes: ReadonlyMap<number, number>
}

const ALIGN = 256

const roundUp = (n: number) => Math.ceil(n / ALIGN) * ALIGN

/**
 * The most bytes live at once on each device (rounded as placed): no plan can use less, so a
 * plan's block over this is what its placement wastes.
 */
export const peakLive = (buffers: ReadonlyArray<Lifetime>): Map<number, number> => {
  const events: Array<{ readonly t: number; readonly device: number; readonly delta: number }> = []
  for (const b of buffers) {
    const size = roundUp(Math.max(b.bytes, 1))
    events.push({ t: b.start, device: b.device, delta: size }, { t: b.end, device: b.device, delta: -size })
  }
  // At one call index, frees (negative) come before allocations: a buffer freed at call t is
  // gone when the one made at t appears.
  events.sort((a, b) => a.t - b.t || a.delta - b.delta)
  const live = new Map<number, number>()
  const peak = new Map<number, number>()
  for (const e of events) {
    const v = (live.get(e.device) ?? 0) + e.delta
    live.set(e.device, v)
    peak.set(e.device, Math.max(peak.get(e.device) ?? 0, v))
  }
  return peak
}

/**
 * Tries a few orders (largest first; longest-lived first; by start) and keeps, per device, the
 * placement with the smallest block: each is a heuristic of the NP-hard packing, and each wins on
 * some lifetime patterns.
 */
export const planMemory = (buffers: ReadonlyArray<Lifetime>): MemoryPlan => {
  const orders: Array<(a: Lifetime, b: Lifetime) => number> = [
    (a, b) => b.bytes - a.bytes || a.start - b.start,
    (a, b) => b.end - b.start - (a.end - a.start) || b.bytes - a.bytes,
    (a, b) => a.start - b.start || b.bytes - a.bytes,
  ]
  const plans = orders.map((o) => place([...buffers].sort(o)))
  const offsets = new Map<number, number>()
  const blockBytes = new Map<number, number>()
  for (const device of new Set(buffers.map((b) => b.device))) {
    const best = plans.reduce((x, y) =>
      (y.blockBytes.get(device) ?? 0) < (x.blockBytes.get(device) ?? 0) ? y : x,
    )
    blockBytes.set(device, best.blockBytes.get(device) ?? 0)
    for (const b of buffers) if (b.device === device) offsets.set(b.key, best.offsets.get(b.key)!)
  }
  return { offsets, blockBytes }
}

/** Places buffers in this order, each at the lowest offset free for its whole lifetime. */
const place = (order: ReadonlyArray<Lifetime>): MemoryPlan => {
  const placed = new Map<
    number,
    Array<{ readonly at: number; readonly size: number; readonly b: Lifetime }>
  >()
  const offsets = new Map<number, number>()
  const blockBytes = new Map<number, number>()
  for (const b of order) {
    const size = roundUp(Math.max(b.bytes, 1))
    const mine = placed.get(b.device) ?? []
    placed.set(b.device, mine)
    const busy = mine.filter((p) => p.b.start < b.end && b.start < p.b.end).sort((x, y) => x.at - y.at)
    let at = 0
    for (const p of busy) {
      if (p.at >= at + size) break
      at = Math.max(at, p.at + p.size)
    }
    mine.push({ at, size, b })
    offsets.set(b.key, at)
    blockBytes.set(b.device, Math.max(blockBytes.get(b.device) ?? 0, at + size))
  }
  return { offsets, blockBytes }
}
