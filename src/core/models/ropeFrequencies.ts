/**
 * RoPE inverse frequencies as transformers computes them (float32), with Llama 3's
 * frequency-dependent scaling ("llama3" rope type).
 */
import type { RopeConfig } from "../config.ts"

export const ropeInverseFrequencies = (rope: RopeConfig, headDim: number): Float64Array => {
  const half = headDim / 2
  const inv = new Float64Array(half)
  for (let i = 0; i < half; i++)
    inv[i] = Math.fround(1 / Math.fround(rope.theta ** Math.fround((2 * i) / headDim)))
  if (rope.type === "default") return inv
  const { factor, lowFreqFactor, highFreqFactor, originalMaxPositionEmbeddings: old } = rope
  const lowWavelen = old / lowFreqFactor
  const highWavelen = old / highFreqFactor
  for (let i = 0; i < half; i++) {
    const f = inv[i]!
    const wavelen = (2 * Math.PI) / f
    let scaled = wavelen > lowWavelen ? f / factor : f
    if (!(wavelen < highWavelen) && !(wavelen > lowWavelen)) {
      const smooth = (old / wavelen - lowFreqFactor) / (highFreqFactor - lowFreqFactor)
      scaled = ((1 - smooth) * scaled) / factor + smooth * scaled
    }
    inv[i] = Math.fround(scaled)
  }
  return inv
}
