/** RoPE (rotate-half) against TypeScript, its transpose (sign −1) as the gradient, aliasing and checks. */
import { afterAll, describe, expect, it } from "vitest"
import {
  Cpu,
  dot,
  expectGradients,
  expectInvalid,
  F32,
  F64,
  type FloatDtype,
  f32,
  Rng,
  relErr,
} from "./helpers.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())
const rng = new Rng(13)

const invFreq = (hd: number) => Float64Array.from({ length: hd / 2 }, (_, i) => 10000 ** ((-2 * i) / hd))

// The angle is a float32 product for float32, as transformers computes it.
const reference = (
  x: ArrayLike<number>,
  pos: ArrayLike<number>,
  inv: ArrayLike<number>,
  [N, H, hd]: number[],
  sign: number,
  scaling: number,
  dtype: FloatDtype,
) => {
  const out = new Float64Array(N! * H! * hd!)
  const half = hd! / 2
  for (let n = 0; n < N!; n++)
    for (let i = 0; i < half; i++) {
      const a = dtype === F32 ? Math.fround(pos[n]! * inv[i]!) : pos[n]! * inv[i]!
      const c = Math.cos(a) * scaling
      const s = sign * Math.sin(a) * scaling
      for (let h = 0; h < H!; h++) {
        const b = (n * H! + h) * hd!
        out[b + i] = x[b + i]! * c - x[b + i + half]! * s
        out[b + i + half] = x[b + i + half]! * c + x[b + i]! * s
      }
    }
  return out
}

describe("rope", () => {
  const [N, H, hd] = [33, 3, 16]
  const pos = Array.from({ length: N }, () => rng.int(0, 4096))

  it.each([1, -1])("forward with sign %i and scaling matches the reference (float32)", (sign) => {
    const x = f32(rng.uniform(N * H * hd))
    const inv = f32(invFreq(hd))
    const out = cpu.filled(N * H * hd, F32, Number.NaN)
    cpu.exec(
      "rope",
      [cpu.float(x, F32), cpu.int32(pos), cpu.float(inv, F32), out],
      [F32, N, H, hd, sign, 1.25],
    )
    const ref = reference(x, pos, inv, [N, H, hd], sign, 1.25, F32)
    expect(relErr(cpu.read(out, N * H * hd, F32), ref)).toBeLessThan(1e-5)
  })

  it("out may alias x", () => {
    const x = f32(rng.uniform(N * H * hd))
    const inv = f32(invFreq(hd))
    const xb = cpu.float(x, F32)
    cpu.exec("rope", [xb, cpu.int32(pos), cpu.float(inv, F32), xb], [F32, N, H, hd, 1, 1])
    expect(relErr(cpu.read(xb, N * H * hd, F32), reference(x, pos, inv, [N, H, hd], 1, 1, F32))).toBeLessThan(
      1e-5,
    )
  })

  it("sign −1 is the gradient of Σ rope(x)·G (float64, finite differences)", () => {
    const [n, h, d] = [5, 2, 8]
    const x = rng.uniform(n * h * d)
    const G = rng.uniform(n * h * d)
    const [xb, pb, ib, out] = [
      cpu.float(x, F64),
      cpu.int32(pos.slice(0, n)),
      cpu.float(invFreq(d), F64),
      cpu.filled(x.length, F64, 0),
    ]
    const loss = ([xs]: ReadonlyArray<Float64Array>) => {
      cpu.write(xb, xs!, F64)
      cpu.exec("rope", [xb, pb, ib, out], [F64, n, h, d, 1, 0.8])
      return dot(cpu.read(out, x.length, F64), G)
    }
    const dx = cpu.filled(x.length, F64, 0)
    cpu.exec("rope", [cpu.float(G, F64), pb, ib, dx], [F64, n, h, d, -1, 0.8])
    expectGradients(loss, [x], [cpu.read(dx, x.length, F64)], rng)
  })

  it("rejects odd head sizes, a bad sign, short buffers and negative sizes", () => {
    const [x, p, i, o] = [
      cpu.filled(N * H * hd, F32, 1),
      cpu.int32(pos),
      cpu.filled(hd / 2, F32, 1),
      cpu.filled(N * H * hd, F32, 0),
    ]
    expectInvalid(() => cpu.exec("rope", [x, p, i, o], [F32, N, H * 2, hd / 2 + 1, 1, 1]), /even/)
    expectInvalid(() => cpu.exec("rope", [x, p, i, o], [F32, N, H, hd, 2, 1]), /sign/)
    expectInvalid(() => cpu.exec("rope", [x, p, i, o], [F32, N + 1, H, hd, 1, 1]), /buffer/)
    expectInvalid(() => cpu.exec("rope", [x, p, i, o], [F32, N, H, hd * 2, 1, 1]), /buffer/)
    expectInvalid(() => cpu.exec("rope", [x, p, i, o], [F32, N, -H, hd, 1, 1]), /non-negative/)
    cpu.exec("rope", [x, p, i, o], [F32, N, 0, hd, 1, 1])
  })
})
