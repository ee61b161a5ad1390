/**
 * The matmul reference and a battery of layouts (every transpose pair, batch strides including 0,
 * offsets, leading dimensions wider than the matrix, alpha and beta, shapes spanning several
 * cache tiles): shared by the matmul tests and the child processes that pin an instruction set.
 */
import { type Cpu, F32, type FloatDtype, f32, Rng, relErr } from "./helpers.ts"

export interface Layout {
  batch: number
  M: number
  N: number
  K: number
  transA: boolean
  transB: boolean
  alpha: number
  beta: number
  lda: number
  ldb: number
  ldc: number
  strideA: number
  strideB: number
  strideC: number
  offA: number
  offB: number
  offC: number
}

/** Row-major defaults: tight leading dimensions and strides, no offsets. */
export const layout = (
  o: Partial<Layout> & Pick<Layout, "M" | "N" | "K"> & { transA?: boolean; transB?: boolean },
): Layout => {
  const transA = o.transA ?? false
  const transB = o.transB ?? false
  const lda = o.lda ?? (transA ? o.M : o.K)
  const ldb = o.ldb ?? (transB ? o.K : o.N)
  const ldc = o.ldc ?? o.N
  return {
    batch: 1,
    alpha: 1,
    beta: 0,
    strideA: (transA ? o.K : o.M) * lda,
    strideB: (transB ? o.N : o.K) * ldb,
    strideC: o.M * ldc,
    offA: 0,
    offB: 0,
    offC: 0,
    ...o,
    transA,
    transB,
    lda,
    ldb,
    ldc,
  }
}

export const matmulArgs = (dtype: FloatDtype, l: Layout): number[] => [
  dtype,
  l.batch,
  l.M,
  l.N,
  l.K,
  l.transA ? 1 : 0,
  l.transB ? 1 : 0,
  l.alpha,
  l.beta,
  l.lda,
  l.ldb,
  l.ldc,
  l.strideA,
  l.strideB,
  l.strideC,
  l.offA,
  l.offB,
  l.offC,
]

/** Elements each operand's buffer must hold. */
export const extents = (l: Layout): [number, number, number] => {
  const reach = (rows: number, cols: number, trans: boolean, ld: number, stride: number, off: number) =>
    off + (l.batch - 1) * stride + (trans ? (cols - 1) * ld + rows : (rows - 1) * ld + cols)
  return [
    reach(l.M, l.K, l.transA, l.lda, l.strideA, l.offA),
    reach(l.K, l.N, l.transB, l.ldb, l.strideB, l.offB),
    reach(l.M, l.N, false, l.ldc, l.strideC, l.offC),
  ]
}

/** C after the matmul, computed in float64 from the given buffer contents. */
export const refMatmul = (l: Layout, A: ArrayLike<number>, B: ArrayLike<number>, C: ArrayLike<number>) => {
  const out = Float64Array.from(C)
  for (let b = 0; b < l.batch; b++)
    for (let i = 0; i < l.M; i++)
      for (let j = 0; j < l.N; j++) {
        let s = 0
        for (let k = 0; k < l.K; k++) {
          const a = A[l.offA + b * l.strideA + (l.transA ? k * l.lda + i : i * l.lda + k)]!
          const bv = B[l.offB + b * l.strideB + (l.transB ? j * l.ldb + k : k * l.ldb + j)]!
          s += a * bv
        }
        const c = l.offC + b * l.strideC + i * l.ldc + j
        out[c] = l.alpha * s + (l.beta === 0 ? 0 : l.beta * C[c]!)
      }
  return out
}

/** Runs one layout on random operands; the relative error over all of C (gaps included). */
export const matmulError = (cpu: Cpu, dtype: FloatDtype, l: Layout, rng: Rng): number => {
  const [na, nb, nc] = extents(l)
  const round = dtype === F32 ? f32 : (x: Float64Array) => x
  const A = round(rng.uniform(na))
  const B = round(rng.uniform(nb))
  const C = round(rng.uniform(nc))
  const ref = refMatmul(l, A, B, C)
  const [a, b, c] = [cpu.float(A, dtype), cpu.float(B, dtype), cpu.float(C, dtype)]
  cpu.exec("matmul", [a, b, c], matmulArgs(dtype, l))
  const out = cpu.read(c, nc, dtype)
  for (const id of [a, b, c]) cpu.free(id)
  return relErr(out, ref)
}

/** Every transpose pair over strided, offset, padded and broadcast layouts. */
export const batteryLayouts = (): Layout[] => {
  const out: Layout[] = []
  for (const transA of [false, true])
    for (const transB of [false, true]) {
      const t = { transA, transB }
      out.push(layout({ M: 5, N: 7, K: 3, ...t }))
      out.push(layout({ M: 130, N: 300, K: 600, alpha: 0.5, beta: 1.5, ...t }))
      const M = 9
      const N = 13
      const K = 11
      const lda = (transA ? M : K) + 3
      const ldb = (transB ? K : N) + 2
      const ldc = N + 5
      const padded = { M, N, K, lda, ldb, ldc, ...t }
      out.push(layout({ ...padded, batch: 3, offA: 7, offB: 2, offC: 4, alpha: -1.25, beta: 0.5 }))
      out.push(layout({ ...padded, batch: 4, strideA: 0, strideC: M * ldc + 3, offC: 1 }))
      out.push(layout({ ...padded, batch: 2, strideB: 0, strideA: 200, beta: 2 }))
      out.push(layout({ M: 70, N: 33, K: 257, batch: 5, strideB: 0, ...t }))
    }
  return out
}

/** The worst error over the whole battery, float32 and float64 (the latter scaled to compare with 1e-5). */
export const worstBatteryError = (cpu: Cpu): { f32: number; f64: number } => {
  const rng = new Rng(17)
  let w32 = 0
  let w64 = 0
  for (const l of batteryLayouts()) {
    w32 = Math.max(w32, matmulError(cpu, 0, l, rng))
    w64 = Math.max(w64, matmulError(cpu, 1, l, rng))
  }
  return { f32: w32, f64: w64 }
}
