/**
 * What the GPU test files share: how many CUDA devices this host has (0 skips the suites), a
 * seeded generator, and bfloat16 rounding done on the host exactly as the kernels round.
 */
import { loadNative } from "../../src/native/index.ts"

export const gpus = (() => {
  try {
    return loadNative().cudaProbe().devices
  } catch {
    return 0
  }
})()

/** A linear congruential generator in [0, 1): the same sequence for the same seed everywhere. */
export const makeUniform = (seed: number) => () => {
  seed = (Math.imul(seed, 1103515245) + 12345) >>> 0
  return seed / 2 ** 32
}

const f32 = new Float32Array(1)
const u32 = new Uint32Array(f32.buffer)
/** float32 → bfloat16 bits, round to nearest even; NaN stays NaN (quiet). */
export const toBf16 = (x: ArrayLike<number>) => {
  const out = new Uint16Array(x.length)
  for (let i = 0; i < x.length; i++) {
    f32[0] = x[i]!
    const u = u32[0]!
    out[i] =
      (u & 0x7fffffff) > 0x7f800000 ? (u >>> 16) | 0x40 : ((u + 0x7fff + ((u >>> 16) & 1)) / 65536) & 0xffff
  }
  return out
}
export const fromBf16 = (h: Uint16Array) => {
  const out = new Float32Array(h.length)
  for (let i = 0; i < h.length; i++) {
    u32[0] = h[i]! << 16
    out[i] = f32[0]!
  }
  return out
}
