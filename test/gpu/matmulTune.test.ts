/**
 * matmul's autotuning on the CUDA backend (src/native/cuda/matmul.cu; `npm run test:gpu`, skipped
 * without a GPU). Products of 1024×1536×2048 (above the tuning threshold of 2^30 multiply-adds)
 * in every transpose combination, float32, bf16 → bf16 and bf16 → float32, beta 0 and 1, packed
 * and with padded leading dimensions and offsets:
 *   - the first call (a plan-cache miss, which times cuBLASLt's candidates on a temporary output
 *     and then runs the pick) equals the CPU backend's product, so with beta = 1 C took the
 *     product exactly once (C = A·B + C_before; twice would be off by ‖C_before‖, ~4%);
 *   - C's padding is untouched (NaN stays NaN under beta = 0, C_before stays under beta = 1);
 *   - a second call (the cached plan) gives the same bits as the first;
 *   - a miss inside a graph capture does not tune (a timing would synchronise, which CUDA refuses
 *     while capturing) and the graph's product has the bits of the same product run eagerly after.
 * Inputs are bf16-exact, so one float32 CPU product is the reference for all three dtypes.
 * MAGIX_MATMUL_TUNE_LOG=1 prints each tuning (candidates, times, pick) to stderr.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { loadNative, type NativeBackend } from "../../src/native/index.ts"
import { fromBf16, gpus, makeUniform, toBf16 } from "./kit.ts"

const uniform = makeUniform(4242)

/** n values uniform in ±1, never zero, rounded to bfloat16. */
const randBf16 = (n: number) =>
  fromBf16(
    toBf16(
      Float32Array.from({ length: n }, () => {
        const x = uniform() * 2 - 1
        return x === 0 ? 1e-3 : x
      }),
    ),
  )

const relErr = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let num = 0
  let den = 0
  for (let i = 0; i < b.length; i++) {
    const x = Number(a[i])
    const y = Number(b[i])
    if (!Number.isFinite(x) || !Number.isFinite(y)) return Number.NaN
    num += (x - y) ** 2
    den += y * y
  }
  return Math.sqrt(num / den)
}

type Kind = "f32" | "bf16"
const upload = (be: NativeBackend, data: Float32Array, kind: Kind) => {
  const id = be.alloc(0, Math.max(4, data.length * (kind === "bf16" ? 2 : 4)))
  be.write(id, 0, kind === "bf16" ? toBf16(data) : data)
  return id
}
const download = (be: NativeBackend, id: number, n: number, kind: Kind) => {
  const bytes = be.read(id, 0, n * (kind === "bf16" ? 2 : 4))
  const buf = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)
  return kind === "bf16" ? fromBf16(new Uint16Array(buf)) : new Float32Array(buf)
}

const M = 1024
const N = 1536
const K = 2048

interface Layout {
  readonly ta: number
  readonly tb: number
  readonly pad: number // added to each leading dimension and used as each offset (elements)
}
const geometry = ({ ta, tb, pad }: Layout) => {
  const lda = (ta ? M : K) + pad
  const ldb = (tb ? K : N) + pad
  const ldc = N + pad
  const nA = pad + (ta ? K : M) * lda
  const nB = pad + (tb ? N : K) * ldb
  const nC = pad + M * ldc
  return { lda, ldb, ldc, nA, nB, nC }
}
/** matmul args (src/native/OPS.md) without the leading dtype and trailing cdtype. */
const mmArgs = (l: Layout, beta: number) => {
  const g = geometry(l)
  return [1, M, N, K, l.ta, l.tb, 1, beta, g.lda, g.ldb, g.ldc, 0, 0, 0, l.pad, l.pad, l.pad]
}
const isWritten = (l: Layout, i: number) => {
  const { ldc } = geometry(l)
  const j = i - l.pad
  return j >= 0 && j < M * ldc && j % ldc < N
}

describe.skipIf(gpus === 0)("matmul autotuning on CUDA", () => {
  let cuda: NativeBackend
  let cpu: NativeBackend
  let mm = -1
  const saved = process.env.MAGIX_MATMUL_TUNE
  beforeAll(() => {
    delete process.env.MAGIX_MATMUL_TUNE // tuning on (read at each plan-cache miss)
    cuda = loadNative().createCuda(1)
    cpu = loadNative().createCpu(1)
    mm = cuda.opNames().indexOf("matmul")
  })
  afterAll(() => {
    cuda?.dispose()
    cpu?.dispose()
    if (saved === undefined) delete process.env.MAGIX_MATMUL_TUNE
    else process.env.MAGIX_MATMUL_TUNE = saved
  })

  /** One matmul on `be`; returns C afterwards (as float32 values). */
  const runOnce = (
    be: NativeBackend,
    A: Float32Array,
    B: Float32Array,
    C: Float32Array,
    ab: Kind,
    c: Kind,
    args: number[],
  ) => {
    const ids = [upload(be, A, ab), upload(be, B, ab), upload(be, C, c)]
    try {
      const dtype = ab === "bf16" ? 2 : 0
      be.exec(be.opNames().indexOf("matmul"), ids, [
        dtype,
        ...args,
        ...(ab === "bf16" && c === "f32" ? [0] : []),
      ])
      return download(be, ids[2]!, C.length, c)
    } finally {
      for (const id of ids) be.free(id)
    }
  }

  const layouts: Layout[] = []
  for (const pad of [0, 8]) for (const ta of [0, 1]) for (const tb of [0, 1]) layouts.push({ ta, tb, pad })

  it.each(layouts)(
    "transA $ta transB $tb pad $pad: equals the CPU, C takes the product once, same bits on the cached plan",
    (l) => {
      const g = geometry(l)
      const A = randBf16(g.nA)
      const B = randBf16(g.nB)
      const C0 = randBf16(g.nC)
      for (const beta of [0, 1]) {
        const Cin = beta ? C0 : new Float32Array(g.nC).fill(Number.NaN)
        const args = mmArgs(l, beta)
        const ref = runOnce(cpu, A, B, beta ? C0 : new Float32Array(g.nC), "f32", "f32", args)
        const refW = ref.filter((_, i) => isWritten(l, i))
        for (const [ab, c, tol] of [
          ["f32", "f32", 1e-5],
          ["bf16", "bf16", 1e-2],
          ["bf16", "f32", 1e-5],
        ] as const) {
          const what = `${ab}→${c} beta ${beta} ${JSON.stringify(l)}`
          const first = runOnce(cuda, A, B, Cin, ab, c, args)
          const second = runOnce(cuda, A, B, Cin, ab, c, args)
          const got = first.filter((_, i) => isWritten(l, i))
          const e = relErr(got, refW)
          expect(Number.isNaN(e), `${what}: non-finite output`).toBe(false)
          expect(e, `${what}: relative error against the CPU`).toBeLessThan(tol)
          for (let i = 0; i < g.nC; i++) {
            if (!isWritten(l, i)) {
              const ok = beta ? first[i] === C0[i] : Number.isNaN(first[i]!)
              if (!ok) expect.fail(`${what}: padding element ${i} changed to ${first[i]}`)
            }
            if (!Object.is(first[i], second[i]))
              expect.fail(`${what}: the cached plan gave ${second[i]} at ${i}, the tuning call ${first[i]}`)
          }
        }
      }
    },
  )

  it("a miss inside a graph capture runs untuned and matches the same product run eagerly", () => {
    expect(mm).toBeGreaterThanOrEqual(0)
    // ldc N + 24: a plan no other test here made, so the capture's call is the miss.
    const ldc = N + 24
    const args = [1, M, N, K, 0, 1, 1, 1, K, K, ldc, 0, 0, 0, 0, 0, 0]
    const A = randBf16(M * K)
    const B = randBf16(N * K)
    const C0 = randBf16(M * ldc)
    const ids = [upload(cuda, A, "bf16"), upload(cuda, B, "bf16"), upload(cuda, C0, "bf16")]
    try {
      cuda.captureBegin()
      let graph: number
      try {
        cuda.exec(mm, ids, [2, ...args])
        graph = cuda.captureEnd()
      } catch (e) {
        cuda.captureAbort()
        throw e
      }
      try {
        cuda.graphLaunch(graph)
        const captured = download(cuda, ids[2]!, M * ldc, "bf16")
        const eager = runOnce(cuda, A, B, C0, "bf16", "bf16", args)
        const ref = runOnce(cpu, A, B, C0, "f32", "f32", args)
        const cols = (a: Float32Array) => a.filter((_, i) => i % ldc < N)
        expect(relErr(cols(captured), cols(ref))).toBeLessThan(1e-2)
        for (let i = 0; i < M * ldc; i++)
          if (!Object.is(captured[i], eager[i]))
            expect.fail(`graph ${captured[i]} ≠ eager ${eager[i]} at ${i}`)
      } finally {
        cuda.graphDestroy(graph)
      }
    } finally {
      for (const id of ids) cuda.free(id)
    }
  })
})
