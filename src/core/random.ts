/**
 * Counter-based random numbers: element i of parameter k under seed s depends only on (s, k, i),
 * so any device can generate exactly its slice and every sharding gives the same tensor.
 */

/** A 32-bit avalanche mix (murmur3's finaliser). */
const mix = (h: number): number => {
  h ^= h >>> 16
  h = Math.imul(h, 0x85ebca6b)
  h ^= h >>> 13
  h = Math.imul(h, 0xc2b2ae35)
  h ^= h >>> 16
  return h >>> 0
}

/** A uniform number in (0, 1) from a (key, counter) pair. */
const uniform = (key: number, counter: number): number => {
  const a = mix(key ^ mix(counter))
  const b = mix(a ^ 0x9e3779b9 ^ Math.imul(counter, 0x27d4eb2d))
  // 53 bits from two words, kept strictly inside (0, 1) for the logarithm below.
  return ((a >>> 5) * 67108864 + (b >>> 6) + 0.5) / 9007199254740992
}

/** A stream key for a (seed, stream) pair, e.g. seed and parameter index. */
export const streamKey = (seed: number, stream: number): number =>
  mix(mix(seed >>> 0) ^ Math.imul(stream + 1, 0x9e3779b1))

/** Standard normal samples for global indices start..start+n of a stream (Box–Muller on pairs). */
export const normalAt = (key: number, index: number): number => {
  const pair = Math.floor(index / 2)
  const u1 = uniform(key, 2 * pair)
  const u2 = uniform(key, 2 * pair + 1)
  const r = Math.sqrt(-2 * Math.log(u1))
  return index % 2 === 0 ? r * Math.cos(2 * Math.PI * u2) : r * Math.sin(2 * Math.PI * u2)
}

export const uniformAt = uniform
