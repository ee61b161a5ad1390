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

/** Places the largest buffers first, each at the lowest offset free for its whole lifetime. */
export const planMemory = (buffers: ReadonlyArray<Lifetime>): MemoryPlan => {
  const order = [...buffers].sort((a, b) => b.bytes - a.bytes || a.start - b.start)
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
