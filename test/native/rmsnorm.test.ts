/** RMSNorm (offset 0: Llama, 1: Gemma) against TypeScript and its backward against finite differences. */
import { afterAll, describe, expect, it } from "vitest"
import { Cpu, dot, expectGradients, expectInvalid, F32, F64, f32, Rng, relErr } from "./helpers.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())
const rng = new Rng(9)
const eps = 1e-5

const reference = (x: ArrayLike<number>, w: ArrayLike<number>, N: number, D: number, offset: number) => {
  const y = new Float64Array(N * D)
  const rstd = new Float64Array(N)
  for (let n = 0; n < N; n++) {
    let ss = 0
    for (let d = 0; d < D; d++) ss += x[n * D + d]! ** 2
    rstd[n] = 1 / Math.sqrt(ss / D + eps)
    for (let d = 0; d < D; d++) y[n * D + d] = x[n * D + d]! * rstd[n]! * (w[d]! + offset)
  }
  return { y, rstd }
}

/** dx = rstd·(g·dy − x̂·mean(g·dy·x̂)), g = w + offset, in float64. */
const referenceDx = (
  dy: ArrayLike<number>,
  x: ArrayLike<number>,
  w: ArrayLike<number>,
  N: number,
  D: number,
  offset: number,
) => {
  const { rstd } = reference(x, w, N, D, offset)
  const dx = new Float64Array(N * D)
  for (let n = 0; n < N; n++) {
    const r = rstd[n]!
    let dot = 0
    for (let d = 0; d < D; d++) dot += dy[n * D + d]! * (w[d]! + offset) * x[n * D + d]! * r
    const mean = dot / D
    for (let d = 0; d < D; d++)
      dx[n * D + d] = r * (dy[n * D + d]! * (w[d]! + offset) - x[n * D + d]! * r * mean)
  }
  return dx
}

describe.each([0, 1])("rmsnorm, offset %i", (offset) => {
  it("forward matches the reference (float32)", () => {
    const [N, D] = [300, 70]
    const x = f32(rng.uniform(N * D, -3, 3))
    const w = f32(rng.uniform(D))
    const ref = reference(x, w, N, D, offset)
    const [y, rstd] = [cpu.filled(N * D, F32, Number.NaN), cpu.filled(N, F32, Number.NaN)]
    cpu.exec("rmsnorm_fwd", [cpu.float(x, F32), cpu.float(w, F32), y, rstd], [F32, N, D, eps, offset])
    expect(relErr(cpu.read(y, N * D, F32), ref.y)).toBeLessThan(1e-5)
    expect(relErr(cpu.read(rstd, N, F32), ref.rstd)).toBeLessThan(1e-5)
  })

  it("backward is the gradient of Σ y·G in x and w, and accumulates dw (float64)", () => {
    const [N, D] = [7, 9]
    const x = rng.uniform(N * D)
    const w = rng.uniform(D)
    const G = rng.uniform(N * D)
    const [xb, wb, y, rstd] = [
      cpu.float(x, F64),
      cpu.float(w, F64),
      cpu.filled(N * D, F64, 0),
      cpu.filled(N, F64, 0),
    ]
    const loss = ([xs, ws]: ReadonlyArray<Float64Array>) => {
      cpu.write(xb, xs!, F64)
      cpu.write(wb, ws!, F64)
      cpu.exec("rmsnorm_fwd", [xb, wb, y, rstd], [F64, N, D, eps, offset])
      return dot(cpu.read(y, N * D, F64), G)
    }
    loss([x, w])
    const [dx, dw] = [cpu.filled(N * D, F64, Number.NaN), cpu.filled(D, F64, Number.NaN)]
    const bwd = [cpu.float(G, F64), xb, wb, rstd, dx, dw]
    cpu.exec("rmsnorm_bwd", bwd, [F64, N, D, offset, 0])
    const dwOnce = cpu.read(dw, D, F64)
    expectGradients(loss, [x, w], [cpu.read(dx, N * D, F64), dwOnce], rng)
    cpu.exec("rmsnorm_bwd", bwd, [F64, N, D, offset, 1])
    expect(
      relErr(
        cpu.read(dw, D, F64),
        dwOnce.map((v) => 2 * v),
      ),
    ).toBeLessThan(1e-15)
  })

  it("backward matches in float32 across many rows (per-chunk dw partials)", () => {
    const [N, D] = [700, 48]
    const x = f32(rng.uniform(N * D))
    const w = f32(rng.uniform(D))
    const G = f32(rng.uniform(N * D))
    const run = (xs: ArrayLike<number>, dtype: 0 | 1) => {
      const [y, rstd, dx, dw] = [
        cpu.filled(N * D, dtype, 0),
        cpu.filled(N, dtype, 0),
        cpu.filled(N * D, dtype, 0),
        cpu.filled(D, dtype, 0),
      ]
      const [xb, wb] = [cpu.float(xs, dtype), cpu.float(w, dtype)]
      cpu.exec("rmsnorm_fwd", [xb, wb, y, rstd], [dtype, N, D, eps, offset])
      cpu.exec("rmsnorm_bwd", [cpu.float(G, dtype), xb, wb, rstd, dx, dw], [dtype, N, D, offset, 0])
      return [cpu.read(dx, N * D, dtype), cpu.read(dw, D, dtype)]
    }
    const [dx32, dw32] = run(x, F32)
    const [dx64, dw64] = run(x, F64)
    expect(relErr(dx32!, dx64!)).toBeLessThan(1e-5)
    expect(relErr(dw32!, dw64!)).toBeLessThan(1e-5)
  })

  it.each([
    ["float32", F32, 1e-5],
    ["float64", F64, 1e-12],
  ] as const)("accumulateDx adds dx into what dx held (%s)", (_, dtype, tol) => {
    const [N, D] = [37, 24]
    const round = (a: Float64Array) => (dtype === F32 ? f32(a) : a)
    const x = round(rng.uniform(N * D, -2, 2))
    const w = round(rng.uniform(D))
    const G = round(rng.uniform(N * D))
    const before = round(rng.uniform(N * D, -3, 3))
    const [xb, wb, y, rstd] = [
      cpu.float(x, dtype),
      cpu.float(w, dtype),
      cpu.filled(N * D, dtype, 0),
      cpu.filled(N, dtype, 0),
    ]
    cpu.exec("rmsnorm_fwd", [xb, wb, y, rstd], [dtype, N, D, eps, offset])
    const [dx, dw] = [cpu.float(before, dtype), cpu.filled(D, dtype, Number.NaN)]
    cpu.exec("rmsnorm_bwd", [cpu.float(G, dtype), xb, wb, rstd, dx, dw], [dtype, N, D, offset, 0, 1])
    const want = referenceDx(G, x, w, N, D, offset).map((v, i) => before[i]! + v)
    expect(relErr(cpu.read(dx, N * D, dtype), want)).toBeLessThan(tol)
    // dw is unaffected by accumulating dx.
    const dw0 = cpu.filled(D, dtype, Number.NaN)
    cpu.exec(
      "rmsnorm_bwd",
      [cpu.float(G, dtype), xb, wb, rstd, cpu.filled(N * D, dtype, 0), dw0],
      [dtype, N, D, offset, 0, 0],
    )
    expect(relErr(cpu.read(dw, D, dtype), cpu.read(dw0, D, dtype))).toBe(0)
  })
})

describe("rmsnorm argument checks", () => {
  it("rejects short buffers, negative and zero widths", () => {
    const [N, D] = [4, 6]
    const [x, w, y, r] = [
      cpu.filled(N * D, F32, 1),
      cpu.filled(D, F32, 1),
      cpu.filled(N * D, F32, 0),
      cpu.filled(N, F32, 0),
    ]
    expectInvalid(() => cpu.exec("rmsnorm_fwd", [x, w, y, r], [F32, N + 1, D, eps, 0]), /buffer 0/)
    expectInvalid(() => cpu.exec("rmsnorm_fwd", [x, r, y, r], [F32, N, D, eps, 0]), /buffer 1/)
    expectInvalid(() => cpu.exec("rmsnorm_fwd", [x, w, y, r], [F32, -N, D, eps, 0]), /non-negative/)
    expectInvalid(() => cpu.exec("rmsnorm_fwd", [x, w, y, r], [F32, N, 0, eps, 0]), /positive/)
    expectInvalid(() => cpu.exec("rmsnorm_bwd", [y, x, w, r, y, r], [F32, N, D, 0, 0]), /buffer 5/)
    expectInvalid(() => cpu.exec("rmsnorm_bwd", [y, x, w, r, y, w], [F32, N, -1, 0, 0]), /non-negative/)
    // An accumulated dx is read as it is written: it must be a buffer of its own.
    expectInvalid(() => cpu.exec("rmsnorm_bwd", [y, x, w, r, y, w], [F32, N, D, 0, 0, 1]), /alias/)
    expectInvalid(() => cpu.exec("rmsnorm_bwd", [y, x, w, r, x, w], [F32, N, D, 0, 0, 1]), /alias/)
  })
})
