/**
 * matmul against a float64 reference over every transpose pair and strided layout, on every
 * instruction set the GEMM was compiled for; its gradients (computed with matmuls of its own
 * transposes) against finite differences; and its argument checks.
 */
import { execFileSync } from "node:child_process"
import { afterAll, describe, expect, it } from "vitest"
import { Cpu, dot, expectGradients, expectInvalid, F32, F64, Rng, relErr } from "./helpers.ts"
import { extents, type Layout, layout, matmulArgs, refMatmul, worstBatteryError } from "./matmulCheck.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())

describe("matmul forward", () => {
  it("matches the reference over every layout of the battery (float32 and float64)", () => {
    const w = worstBatteryError(cpu)
    expect(w.f32).toBeLessThan(1e-5)
    expect(w.f64).toBeLessThan(1e-12)
  })

  // The battery again in child processes whose GEMM is capped at AVX2 and at the SSE baseline,
  // so the kernels this CPU would not pick are checked too.
  it.each(["avx2", "base"])("with the instruction set capped at %s", (isa) => {
    const script = `
      import { Cpu } from "./test/native/helpers.ts"
      import { worstBatteryError } from "./test/native/matmulCheck.ts"
      const cpu = new Cpu(); console.log(JSON.stringify(worstBatteryError(cpu))); cpu.dispose()`
    const out = execFileSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      env: { ...process.env, MAGIX_CPU_ISA: isa },
      encoding: "utf8",
    })
    const w = JSON.parse(out.trim().split("\n").pop()!) as { f32: number; f64: number }
    expect(w.f32).toBeLessThan(1e-5)
    expect(w.f64).toBeLessThan(1e-12)
  })

  it("beta = 0 never reads C, and entries outside the matrices are left alone", () => {
    const rng = new Rng(3)
    const l = layout({ M: 6, N: 5, K: 4, ldc: 8, batch: 2, strideC: 50, offC: 3, transB: true })
    const [na, nb, nc] = extents(l)
    const A = rng.uniform(na)
    const B = rng.uniform(nb)
    const C = new Float64Array(nc).fill(Number.NaN)
    const c = cpu.float(C, F64)
    cpu.exec("matmul", [cpu.float(A, F64), cpu.float(B, F64), c], matmulArgs(F64, l))
    const out = cpu.read(c, nc, F64)
    const ref = refMatmul(l, A, B, C)
    const written = [...ref.keys()].filter((i) => !Number.isNaN(ref[i]!))
    expect(written.length).toBe(2 * 6 * 5)
    expect(
      relErr(
        written.map((i) => out[i]!),
        written.map((i) => ref[i]!),
      ),
    ).toBeLessThan(1e-14)
    expect([...out.keys()].filter((i) => Number.isNaN(out[i]!)).length).toBe(nc - written.length)
  })

  it("K = 0 scales C by beta; M = 0 touches nothing", () => {
    const c = cpu.float([1, 2, 3, 4, 5, 6], F32)
    const empty = cpu.bytes(0)
    cpu.exec("matmul", [empty, empty, c], matmulArgs(F32, layout({ M: 2, N: 3, K: 0, beta: 2 })))
    expect([...cpu.read(c, 6, F32)]).toEqual([2, 4, 6, 8, 10, 12])
    const b = cpu.filled(12, F32, 1)
    cpu.exec("matmul", [empty, b, c], matmulArgs(F32, layout({ M: 0, N: 3, K: 4, beta: 0 })))
    expect([...cpu.read(c, 6, F32)]).toEqual([2, 4, 6, 8, 10, 12])
  })
})

describe("matmul gradients (float64, finite differences)", () => {
  // For L = Σ C·G with C = op(A)·op(B): dop(A) = G·op(B)ᵀ and dop(B) = op(A)ᵀ·G, each written
  // in its operand's stored layout by a matmul of the right transposes.
  it.each([
    [false, false],
    [false, true],
    [true, false],
    [true, true],
  ])("transA = %s, transB = %s", (transA, transB) => {
    const rng = new Rng(11)
    const [M, N, K] = [4, 5, 3]
    const l = layout({ M, N, K, transA, transB })
    const A = rng.uniform(M * K)
    const B = rng.uniform(K * N)
    const G = rng.uniform(M * N)
    const [a, b, c, g] = [cpu.float(A, F64), cpu.float(B, F64), cpu.filled(M * N, F64, 0), cpu.float(G, F64)]
    const loss = ([x, y]: ReadonlyArray<Float64Array>) => {
      cpu.write(a, x!, F64)
      cpu.write(b, y!, F64)
      cpu.exec("matmul", [a, b, c], matmulArgs(F64, l))
      return dot(cpu.read(c, M * N, F64), G)
    }
    const da = cpu.filled(M * K, F64, 0)
    const db = cpu.filled(K * N, F64, 0)
    cpu.write(a, A, F64)
    cpu.write(b, B, F64)
    // dA stored [M, K] = G·op(B)ᵀ, or stored [K, M] = op(B)·Gᵀ.
    const gradA: Layout = transA
      ? layout({ M: K, N: M, K: N, transA: transB, transB: true })
      : layout({ M, N: K, K: N, transB: !transB })
    cpu.exec("matmul", transA ? [b, g, da] : [g, b, da], matmulArgs(F64, gradA))
    // dB stored [K, N] = op(A)ᵀ·G, or stored [N, K] = Gᵀ·op(A).
    const gradB: Layout = transB
      ? layout({ M: N, N: K, K: M, transA: true, transB: transA })
      : layout({ M: K, N, K: M, transA: !transA })
    cpu.exec("matmul", transB ? [g, a, db] : [a, g, db], matmulArgs(F64, gradB))
    expectGradients(loss, [A, B], [cpu.read(da, M * K, F64), cpu.read(db, K * N, F64)], rng)
  })
})

describe("matmul argument checks", () => {
  const l = layout({ M: 4, N: 5, K: 3, batch: 2 })
  const [na, nb, nc] = extents(l)
  const a = cpu.filled(na, F32, 1)
  const b = cpu.filled(nb, F32, 1)
  const c = cpu.filled(nc, F32, 0)
  const run = (over: Partial<Layout>, bufs = [a, b, c], dtype = F32) =>
    cpu.exec("matmul", bufs, matmulArgs(dtype, { ...l, ...over }))

  it("accepts the valid call", () => {
    run({})
    expect(relErr(cpu.read(c, nc, F32), new Array(nc).fill(3))).toBe(0)
  })
  it("rejects buffers one element short", () => {
    const short = cpu.filled(na - 1, F32, 1)
    expectInvalid(() => run({}, [short, b, c]), /buffer 0/)
    expectInvalid(() => run({ offB: 1 }), /buffer 1/)
    expectInvalid(() => run({ strideC: l.strideC + 1 }), /buffer 2/)
    expectInvalid(() => run({ lda: l.lda + 1 }), /buffer 0/)
    expectInvalid(() => run({}, [a, b, c], F64), /buffer/)
  })
  it("rejects negative sizes, strides and offsets", () => {
    for (const key of ["M", "N", "K", "batch", "lda", "strideA", "offC"] as const)
      expectInvalid(() => run({ [key]: -1 }), /non-negative/)
  })
  it("rejects strides so large that the reach overflows", () => {
    expectInvalid(() => run({ batch: 5, strideA: 2 ** 62 }), /overflow/)
    expectInvalid(() => run({ M: 2 ** 40, lda: 2 ** 40 }), /overflow/)
  })
  it("rejects ldc < N, overlapping outputs, aliasing and non-float dtypes", () => {
    expectInvalid(() => run({ ldc: 4, strideC: 20 }), /ldc/)
    expectInvalid(() => run({ strideC: 0 }), /overlap/)
    expectInvalid(() => run({}, [c, b, c]), /alias/)
    expectInvalid(() => cpu.exec("matmul", [a, b, c], matmulArgs(2 as never, l)), /float32 or float64/)
    expectInvalid(() => cpu.exec("matmul", [a, b, c], [...matmulArgs(F32, l), 2]), /dtype/)
  })
})
