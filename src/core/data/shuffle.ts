/**
 * The order documents are visited in: one seeded permutation per epoch. pure-rand is integer
 * arithmetic only, so the same (seed, epoch, n) gives the same order on every machine and every
 * process, which is what lets each process build its own rows of a global batch without talking
 * to the others, and a resumed run see the documents it would have seen.
 */
import { uniformInt } from "pure-rand/distribution/uniformInt"
import { xoroshiro128plus } from "pure-rand/generator/xoroshiro128plus"

/** murmur3's 32-bit finaliser: nearby (seed, epoch) pairs give unrelated generator seeds. */
const mix = (h: number): number => {
  h ^= h >>> 16
  h = Math.imul(h, 0x85ebca6b)
  h ^= h >>> 13
  h = Math.imul(h, 0xc2b2ae35)
  h ^= h >>> 16
  return h >>> 0
}

/** The generator seed of one epoch: fixed here, since changing it would reorder resumed runs. */
export const epochSeed = (seed: number, epoch: number): number =>
  mix(mix(seed >>> 0) ^ Math.imul(epoch + 1, 0x9e3779b1)) | 0

/**
 * The documents of `epoch` in visiting order: a Fisher–Yates shuffle of 0..n-1 under
 * (seed, epoch), or 0..n-1 itself when `shuffle` is false.
 */
export const epochPermutation = (seed: number, epoch: number, n: number, shuffle = true): Uint32Array => {
  const order = new Uint32Array(n)
  for (let i = 0; i < n; i++) order[i] = i
  if (!shuffle) return order
  const rng = xoroshiro128plus(epochSeed(seed, epoch))
  for (let i = n - 1; i > 0; i--) {
    const j = uniformInt(rng, 0, i)
    const t = order[i]!
    order[i] = order[j]!
    order[j] = t
  }
  return order
}
