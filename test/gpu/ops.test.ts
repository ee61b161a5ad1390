/**
 * Every op of the CUDA backend against the CPU backend (the reference), one native call at a
 * time. Runs with `npm run test:gpu` on a machine with a GPU; skipped where none is present.
 *
 * Inputs are random and never zero; outputs are poisoned with NaN before each call, so an element
 * the op fails to write shows. float32 runs both backends on the same inputs (relative error
 * ‖cuda − cpu‖ / ‖cpu‖ under 1e-5); bfloat16 runs CUDA on bf16 inputs and the CPU in float32 on
 * the same bf16-rounded values (under 1e-2). NaN never passes.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { translateNativeError } from "../../src/layers/nativeBackend.ts"
import { loadNative, type NativeBackend } from "../../src/native/index.ts"
import { fromBf16, gpus, makeUniform, toBf16 } from "./kit.ts"

// ---- host-side data ----

const uniform = makeUniform(12345)
/** Uniform in ±scale, never exactly zero. */
const rand = (n: number, scale = 1) =>
  Float32Array.from({ length: n }, () => {
    const x = (uniform() * 2 - 1) * scale
    return x === 0 ? scale * 1e-3 : x
  })
const randInt = (n: number, lo: number, hi: number) =>
  Int32Array.from({ length: n }, () => lo + Math.floor(uniform() * (hi - lo)))

const roundBf16 = (x: ArrayLike<number>) => fromBf16(toBf16(x))

/** ‖a − b‖ / ‖b‖ over the finite entries of b; ±∞ in b must be matched exactly; NaN fails. */
const relErr = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  if (a.length !== b.length) return Number.POSITIVE_INFINITY
  let num = 0
  let den = 0
  for (let i = 0; i < b.length; i++) {
    const x = Number(a[i])
    const y = Number(b[i])
    if (Number.isNaN(x) || Number.isNaN(y)) return Number.NaN
    if (!Number.isFinite(y)) {
      if (x !== y) return Number.POSITIVE_INFINITY
      continue
    }
    num += (x - y) ** 2
    den += y * y
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den)
}

const expectClose = (got: ArrayLike<number>, ref: ArrayLike<number>, tol: number, what: string) => {
  const e = relErr(got, ref)
  expect(Number.isNaN(e), `${what}: NaN`).toBe(false)
  expect(e, `${what}: relative error`).toBeLessThan(tol)
}

// ---- buffers ----

/**
 * A buffer of an op call. Kinds: "c" the compute dtype (float32, or bfloat16 on CUDA under dtype
 * 2), "f32" always float32 (stats, weight gradients), "f64", "i32", "u8". Without data, a float
 * buffer starts as NaN (poison).
 */
interface Buf {
  readonly kind: "c" | "f32" | "f64" | "i32" | "u8"
  readonly n: number
  readonly data?: ArrayLike<number>
}
const c = (n: number, data?: ArrayLike<number>): Buf => ({ kind: "c", n, ...(data ? { data } : {}) })
const s32 = (n: number, data?: ArrayLike<number>): Buf => ({ kind: "f32", n, ...(data ? { data } : {}) })
const s64 = (n: number, data?: ArrayLike<number>): Buf => ({ kind: "f64", n, ...(data ? { data } : {}) })
const i32 = (data: ArrayLike<number>): Buf => ({ kind: "i32", n: data.length, data })
const u8 = (data: ArrayLike<number>): Buf => ({ kind: "u8", n: data.length, data })

const bytesOf = (b: Buf, bf16: boolean) => {
  const size = b.kind === "f64" ? 8 : b.kind === "u8" ? 1 : b.kind === "c" && bf16 ? 2 : 4
  return Math.max(4, b.n * size)
}

const hostArray = (b: Buf, bf16: boolean): ArrayBufferView => {
  const fill = (n: number) => (b.data ? Array.from(b.data) : new Array<number>(n).fill(Number.NaN))
  switch (b.kind) {
    case "c":
      return bf16 ? toBf16(fill(b.n)) : Float32Array.from(fill(b.n))
    case "f32":
      return Float32Array.from(fill(b.n))
    case "f64":
      return Float64Array.from(fill(b.n))
    case "i32":
      return Int32Array.from(b.data ?? new Array<number>(b.n).fill(0))
    case "u8":
      return Uint8Array.from(b.data ?? new Array<number>(b.n).fill(0))
  }
}

const readBack = (be: NativeBackend, id: number, b: Buf, bf16: boolean): Float64Array => {
  const bytes = be.read(id, 0, bytesOf(b, bf16))
  const buf = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)
  let arr: ArrayLike<number>
  switch (b.kind) {
    case "c":
      arr = bf16 ? fromBf16(new Uint16Array(buf, 0, b.n)) : new Float32Array(buf, 0, b.n)
      break
    case "f32":
      arr = new Float32Array(buf, 0, b.n)
      break
    case "f64":
      arr = new Float64Array(buf, 0, b.n)
      break
    case "i32":
      arr = new Int32Array(buf, 0, b.n)
      break
    case "u8":
      arr = new Uint8Array(buf, 0, b.n)
      break
  }
  return Float64Array.from(arr)
}

/**
 * Runs `op` once on `be` over fresh buffers (device `device`); returns every buffer's contents
 * afterwards. `alias[i] = j` passes buffer j again in place of buffer i.
 */
const run = (
  be: NativeBackend,
  op: string,
  bufs: ReadonlyArray<Buf>,
  args: ReadonlyArray<number>,
  bf16 = false,
  alias: Record<number, number> = {},
  device = 0,
): Float64Array[] => {
  const code = be.opNames().indexOf(op)
  if (code < 0) throw new Error(`${be.kind} has no op ${op}`)
  const ids: number[] = []
  try {
    for (const b of bufs) {
      const id = be.alloc(device, bytesOf(b, bf16))
      ids.push(id)
      be.write(id, 0, hostArray(b, bf16))
    }
    const pass = ids.map((id, i) => (i in alias ? ids[alias[i]!]! : id))
    be.exec(code, pass, args)
    return bufs.map((b, i) => readBack(be, ids[i]!, b, bf16))
  } finally {
    for (const id of ids) be.free(id)
  }
}

/** Rounds the compute-dtype inputs of a call through bfloat16 (what CUDA sees under dtype 2). */
const rounded = (bufs: ReadonlyArray<Buf>) =>
  bufs.map((b) => (b.kind === "c" && b.data ? { ...b, data: roundBf16(b.data) } : b))

describe.skipIf(gpus === 0)("CUDA ops equal the CPU backend's", () => {
  let cuda: NativeBackend
  let cpu: NativeBackend
  beforeAll(() => {
    cuda = loadNative().createCuda(1)
    cpu = loadNative().createCpu(1)
  })
  afterAll(() => {
    cuda?.dispose()
    cpu?.dispose()
  })

  /**
   * Runs the op in float32 on both backends (same inputs) and, when `tol.bf16` is given, in
   * bfloat16 on CUDA against float32 on the CPU over the same rounded inputs. `make(dtype)` gives
   * the buffers and the arguments (args[0], the dtype, is set here: `dtype` on CUDA, 0 on the
   * CPU); `outs` are the buffers compared, optionally through a view of their meaningful part.
   */
  const compare = (
    name: string,
    make: (dtype: 0 | 2) => { bufs: Buf[]; args: number[]; alias?: Record<number, number> },
    outs: ReadonlyArray<number | [number, (a: Float64Array) => ArrayLike<number>]>,
    tol: { f32?: number; bf16?: number | undefined } = {},
  ) => {
    const tol32 = tol.f32 ?? 1e-5
    for (const dt of tol.bf16 === undefined ? ([0] as const) : ([0, 2] as const)) {
      const spec = make(dt)
      const ins = dt === 2 ? rounded(spec.bufs) : spec.bufs
      const got = run(cuda, name, ins, [dt, ...spec.args.slice(1)], dt === 2, spec.alias)
      const ref = run(cpu, name, ins, [0, ...spec.args.slice(1)], false, spec.alias)
      for (const o of outs) {
        const [i, view] = typeof o === "number" ? [o, (a: Float64Array) => a] : o
        expectClose(
          view(got[i]!),
          view(ref[i]!),
          dt === 0 ? tol32 : (tol.bf16 as number),
          `${name} dtype ${dt} buffer ${i}`,
        )
      }
    }
  }

  it("fill, cast and copy_box", () => {
    const [f] = run(cuda, "fill", [s32(1001)], [0, 1001, 2.5])
    expect(Array.from(f!).every((x) => x === 2.5)).toBe(true)
    const x = rand(1003, 100)
    const [, y] = run(cuda, "cast", [s32(1003, x), c(1003)], [0, 2, 1003], true)
    expect(Array.from(y!)).toEqual(Array.from(roundBf16(x)))
    const src = rand(6 * 7)
    const box = [2, 6, 7, 1, 2, 4, 5, 0, 1, 3, 4]
    const got = run(cuda, "copy_box", [s32(42, src), s32(20, new Array(20).fill(0))], [4, ...box])
    const ref = run(cpu, "copy_box", [s32(42, src), s32(20, new Array(20).fill(0))], [4, ...box])
    expect(Array.from(got[1]!)).toEqual(Array.from(ref[1]!))
  })

  it("axpby, add and mul (odd lengths, in place)", () => {
    const n = 10007
    const x = rand(n)
    const y = rand(n)
    compare("axpby", () => ({ bufs: [c(n, x), c(n, y)], args: [0, n, 0.7, -1.3] }), [1], { bf16: 1e-2 })
    compare("axpby", () => ({ bufs: [c(n, x), c(n)], args: [0, n, 0.7, 0] }), [1], { bf16: 1e-2 })
    for (const op of ["add", "mul"]) {
      compare(op, () => ({ bufs: [c(n, x), c(n, y), c(n)], args: [0, n] }), [2], { bf16: 1e-2 })
      compare(op, () => ({ bufs: [c(n, x), c(n, y), c(n)], args: [0, n], alias: { 2: 0 } }), [0], {
        bf16: 1e-2,
      })
    }
  })

  it("matmul: transposes, strided and broadcast batches, offsets, leading dimensions, alpha and beta", () => {
    const cases = [
      { batch: 1, M: 64, N: 48, K: 80, ta: 0, tb: 0, alpha: 1, beta: 0 },
      { batch: 3, M: 37, N: 45, K: 61, ta: 0, tb: 1, alpha: 0.7, beta: 0.3 },
      { batch: 2, M: 33, N: 29, K: 17, ta: 1, tb: 0, alpha: -1.1, beta: 1 },
      { batch: 4, M: 16, N: 24, K: 40, ta: 1, tb: 1, alpha: 1, beta: 0, broadcastB: true },
      { batch: 1, M: 128, N: 256, K: 512, ta: 0, tb: 1, alpha: 1, beta: 0 },
    ]
    for (const m of cases) {
      const lda = (m.ta ? m.M : m.K) + 3
      const ldb = (m.tb ? m.K : m.N) + 5
      const ldc = m.N + 2
      const rowsA = m.ta ? m.K : m.M
      const rowsB = m.tb ? m.N : m.K
      const sa = rowsA * lda + 7
      const sb = m.broadcastB ? 0 : rowsB * ldb + 1
      const sc = m.M * ldc + 3
      const [oa, ob, oc] = [5, 3, 8]
      const nA = oa + (m.batch - 1) * sa + rowsA * lda
      const nB = ob + (m.batch - 1) * sb + rowsB * ldb
      const nC = oc + (m.batch - 1) * sc + m.M * ldc
      const A = rand(nA)
      const B = rand(nB)
      const C0 = rand(nC)
      const args = [
        m.batch,
        m.M,
        m.N,
        m.K,
        m.ta,
        m.tb,
        m.alpha,
        m.beta,
        lda,
        ldb,
        ldc,
        sa,
        sb,
        sc,
        oa,
        ob,
        oc,
      ]
      // Only the elements the op writes are compared (C's padding stays as it was: NaN or C0).
      const written = (a: Float64Array) => {
        const out: number[] = []
        for (let b = 0; b < m.batch; b++)
          for (let i = 0; i < m.M; i++) for (let j = 0; j < m.N; j++) out.push(a[oc + b * sc + i * ldc + j]!)
        return out
      }
      const Cinit = m.beta !== 0 ? C0 : undefined
      // float32, and bf16 in with bf16 out
      compare(
        "matmul",
        (dt) => ({ bufs: [c(nA, A), c(nB, B), c(nC, Cinit)], args: [dt, ...args] }),
        [[2, written]],
        {
          bf16: 1e-2,
        },
      )
      // bf16 in, float32 out (cdtype 0): against the CPU's float32 on rounded inputs
      const got = run(
        cuda,
        "matmul",
        rounded([c(nA, A), c(nB, B)]).concat([s32(nC, Cinit)]),
        [2, ...args, 0],
        true,
      )
      const ref = run(cpu, "matmul", rounded([c(nA, A), c(nB, B)]).concat([s32(nC, Cinit)]), [0, ...args])
      expectClose(written(got[2]!), written(ref[2]!), 1e-2, `matmul bf16→f32 ${JSON.stringify(m)}`)
    }
  })

  it("embedding forward and backward with a vocabulary shard and ids outside it", () => {
    const [N, V, D, start] = [300, 64, 96, 40]
    const table = rand(V * D)
    const ids = randInt(N, 0, 130)
    const dout = rand(N * D)
    compare(
      "embedding_fwd",
      () => ({ bufs: [c(V * D, table), i32(ids), c(N * D)], args: [0, N, V, D, start] }),
      [2],
      {
        bf16: 1e-2,
      },
    )
    for (const acc of [0, 1]) {
      const init = acc ? rand(V * D) : undefined
      compare(
        "embedding_bwd",
        (dt) => ({ bufs: [i32(ids), c(N * D, dout), s32(V * D, init)], args: [dt, N, V, D, start, acc] }),
        [2],
        { bf16: 1e-2 },
      )
    }
  })

  it("rmsnorm forward and backward, both offsets, vector and scalar widths", () => {
    for (const D of [320, 100, 2048]) {
      const N = 37
      const x = rand(N * D, 2)
      const w = rand(D)
      const dy = rand(N * D)
      for (const offset of [0, 1]) {
        compare(
          "rmsnorm_fwd",
          (dt) => ({ bufs: [c(N * D, x), c(D, w), c(N * D), s32(N)], args: [dt, N, D, 1e-5, offset] }),
          [2, 3],
          { bf16: 1e-2 },
        )
        // rstd from the CPU's float32 forward pass, shared by both backward runs
        const [, , , rstd] = run(
          cpu,
          "rmsnorm_fwd",
          [c(N * D, x), c(D, w), c(N * D), s32(N)],
          [0, N, D, 1e-5, offset],
        )
        const rstdB = run(cpu, "rmsnorm_fwd", rounded([c(N * D, x), c(D, w), c(N * D), s32(N)]), [
          0,
          N,
          D,
          1e-5,
          offset,
        ])[3]!
        // accumulateDw alone, then both: dx (+)= must add onto what dx held
        for (const [acc, accDx] of [
          [0, 0],
          [1, 0],
          [1, 1],
        ] as const) {
          const init = acc ? rand(D) : undefined
          const dx0 = accDx ? rand(N * D) : undefined
          compare(
            "rmsnorm_bwd",
            (dt) => ({
              bufs: [
                c(N * D, dy),
                c(N * D, x),
                c(D, w),
                s32(N, dt === 2 ? rstdB : rstd),
                c(N * D, dx0),
                s32(D, init),
              ],
              args: [dt, N, D, offset, acc, accDx],
            }),
            [4, 5],
            { bf16: 1e-2 },
          )
        }
      }
    }
  })

  it("rope forward and transpose, long positions, vector and scalar head sizes", () => {
    for (const hd of [64, 128, 6]) {
      const [N, H] = [80, 4]
      const x = rand(N * H * hd)
      const pos = randInt(N, 0, 8000)
      const inv = Float32Array.from({ length: hd / 2 }, (_, i) => 10000 ** (-(2 * i) / hd))
      for (const sign of [1, -1])
        compare(
          "rope",
          (dt) => ({
            bufs: [c(N * H * hd, x), i32(pos), s32(hd / 2, inv), c(N * H * hd)],
            args: [dt, N, H, hd, sign, 0.9],
          }),
          [3],
          { bf16: 1e-2 },
        )
      compare(
        "rope",
        (dt) => ({
          bufs: [c(N * H * hd, x), i32(pos), s32(hd / 2, inv), c(N * H * hd)],
          args: [dt, N, H, hd, 1, 1],
          alias: { 3: 0 },
        }),
        [0],
        { bf16: 1e-2 },
      )
    }
  })

  it("glu forward and backward, SiLU and tanh-GELU", () => {
    const n = 4099
    const g = rand(n, 4)
    const u = rand(n)
    const dh = rand(n)
    for (const act of [0, 1]) {
      compare("glu_fwd", (dt) => ({ bufs: [c(n, g), c(n, u), c(n)], args: [dt, n, act] }), [2], {
        bf16: 1e-2,
      })
      compare(
        "glu_bwd",
        (dt) => ({ bufs: [c(n, g), c(n, u), c(n, dh), c(n), c(n)], args: [dt, n, act] }),
        [3, 4],
        {
          bf16: 1e-2,
        },
      )
    }
  })

  it("sum and sumsq, weighted and accumulated; the same bits twice", () => {
    const n = 100003
    const x = rand(n)
    for (const acc of [0, 1]) {
      compare(
        "sum",
        (dt) => ({ bufs: [c(n, x), s32(1, acc ? [0.25] : undefined)], args: [dt, n, 0.5, acc] }),
        [1],
        {
          bf16: 1e-2,
        },
      )
      compare(
        "sumsq",
        (dt) => ({ bufs: [c(n, x), s64(1, acc ? [0.25] : undefined)], args: [dt, n, 0.5, acc] }),
        [1],
        {
          bf16: 1e-2,
        },
      )
    }
    const a = run(cuda, "sumsq", [c(n, x), s64(1)], [0, n, 1, 0])[1]![0]
    const b = run(cuda, "sumsq", [c(n, x), s64(1)], [0, n, 1, 0])[1]![0]
    expect(a).toBe(b)
  })

  describe("attention", () => {
    interface Case {
      B: number
      T: number
      S: number
      sMax: number
      Hq: number
      Hkv: number
      causal: number
      window: number
      qOffset: number
      mask: boolean
    }
    const cases: Array<[string, Case]> = [
      [
        "causal GQA",
        { B: 2, T: 150, S: 150, sMax: 150, Hq: 4, Hkv: 2, causal: 1, window: 0, qOffset: 0, mask: false },
      ],
      [
        "not causal, S = T (cuDNN takes it)",
        { B: 2, T: 100, S: 100, sMax: 100, Hq: 4, Hkv: 2, causal: 0, window: 0, qOffset: 0, mask: false },
      ],
      [
        "sliding window",
        { B: 2, T: 150, S: 150, sMax: 150, Hq: 4, Hkv: 1, causal: 1, window: 37, qOffset: 0, mask: false },
      ],
      [
        "key mask",
        { B: 2, T: 90, S: 90, sMax: 90, Hq: 2, Hkv: 2, causal: 1, window: 0, qOffset: 0, mask: true },
      ],
      [
        "not causal",
        { B: 1, T: 70, S: 130, sMax: 130, Hq: 2, Hkv: 1, causal: 0, window: 0, qOffset: 0, mask: false },
      ],
      [
        "qOffset, sMax > S",
        { B: 2, T: 33, S: 100, sMax: 120, Hq: 4, Hkv: 2, causal: 1, window: 0, qOffset: 67, mask: true },
      ],
      [
        "fully masked rows",
        { B: 1, T: 40, S: 40, sMax: 40, Hq: 2, Hkv: 1, causal: 1, window: 3, qOffset: 0, mask: true },
      ],
    ]
    // path: unset takes cuDNN where it applies (bf16, no window/mask/offset), our kernels elsewhere;
    // "flash" our kernels only; "reference" the float32 path for bf16 too.
    const attention = (hd: number, k: Case, path?: "flash" | "reference") => {
      const qn = k.B * k.T * k.Hq * hd
      const kn = k.B * k.sMax * k.Hkv * hd
      const q = rand(qn)
      const kk = rand(kn)
      const v = rand(kn)
      const dO = rand(qn)
      // The fully-masked case hides every key of some rows: mask the first 5 keys of the sequence.
      const mask = Uint8Array.from({ length: k.B * k.sMax }, (_, i) =>
        k.T === 40 ? (i % k.sMax < 5 ? 0 : 1) : i % 7 === 3 ? 0 : 1,
      )
      const args = (dt: number) => [
        dt,
        k.B,
        k.T,
        k.S,
        k.Hq,
        k.Hkv,
        hd,
        1 / Math.sqrt(hd),
        k.causal,
        k.window,
        k.qOffset,
        k.mask ? 1 : 0,
        k.sMax,
      ]
      const maskBuf = k.mask ? [u8(mask)] : []
      // dk, dv are defined on the first S rows of each batch only.
      const firstS = (a: Float64Array) => {
        const out: number[] = []
        for (let b = 0; b < k.B; b++)
          for (let i = 0; i < k.S * k.Hkv * hd; i++) out.push(a[b * k.sMax * k.Hkv * hd + i]!)
        return out
      }
      if (path) process.env.MAGIX_ATTENTION = path
      try {
        compare(
          "attention_fwd",
          (dt) => ({
            bufs: [c(qn, q), c(kn, kk), c(kn, v), c(qn), s32(k.B * k.Hq * k.T), ...maskBuf],
            args: args(dt),
          }),
          [3, 4],
          { bf16: 1e-2 },
        )
        // The backward pass gets o and lse from the CPU's forward pass on the same (rounded) inputs.
        for (const dt of [0, 2] as const) {
          const ins = [c(qn, q), c(kn, kk), c(kn, v)]
          const fwdIns = dt === 2 ? rounded(ins) : ins
          const fwd = run(
            cpu,
            "attention_fwd",
            [...fwdIns, c(qn), s32(k.B * k.Hq * k.T), ...maskBuf],
            args(0),
          )
          const bufs = (bf: boolean): Buf[] => {
            const base = [
              c(qn, q),
              c(kn, kk),
              c(kn, v),
              c(qn, fwd[3]!),
              s32(k.B * k.Hq * k.T, fwd[4]!),
              c(qn, dO),
            ]
            return [...(bf ? rounded(base) : base), c(qn), c(kn), c(kn), ...maskBuf]
          }
          const got = run(cuda, "attention_bwd", bufs(dt === 2), args(dt), dt === 2)
          const ref = run(cpu, "attention_bwd", bufs(dt === 2), args(0))
          const tol = dt === 0 ? 1e-5 : 1e-2
          expectClose(got[6]!, ref[6]!, tol, `attention_bwd dq hd ${hd} dtype ${dt}`)
          expectClose(firstS(got[7]!), firstS(ref[7]!), tol, `attention_bwd dk hd ${hd} dtype ${dt}`)
          expectClose(firstS(got[8]!), firstS(ref[8]!), tol, `attention_bwd dv hd ${hd} dtype ${dt}`)
        }
      } finally {
        if (path) delete process.env.MAGIX_ATTENTION
      }
    }
    for (const hd of [64, 128, 16])
      for (const [name, k] of cases) it(`head size ${hd}: ${name}`, () => attention(hd, k))
    for (const hd of [64, 128])
      for (const [name, k] of cases)
        it(`our flash kernels, head size ${hd}: ${name}`, () => attention(hd, k, "flash"))
    it("the reference path agrees too (bf16 through it)", () => attention(64, cases[0]![1], "reference"))

    it("fully masked rows give o = 0, lse = −∞ and no gradient", () => {
      const [B, T, Hq, hd] = [1, 64, 2, 64]
      const n = B * T * Hq * hd
      const mask = new Uint8Array(T).fill(0)
      const args = [2, B, T, T, Hq, Hq, hd, 0.125, 1, 0, 0, 1, T]
      const out = run(
        cuda,
        "attention_fwd",
        [c(n, rand(n)), c(n, rand(n)), c(n, rand(n)), c(n), s32(B * Hq * T), u8(mask)],
        args,
        true,
      )
      expect(Array.from(out[3]!).every((x) => x === 0)).toBe(true)
      expect(Array.from(out[4]!).every((x) => x === Number.NEGATIVE_INFINITY)).toBe(true)
      const bwd = run(
        cuda,
        "attention_bwd",
        [
          c(n, rand(n)),
          c(n, rand(n)),
          c(n, rand(n)),
          c(n, out[3]!),
          s32(B * Hq * T, out[4]!),
          c(n, rand(n)),
          c(n),
          c(n),
          c(n),
          u8(mask),
        ],
        args,
        true,
      )
      for (const i of [6, 7, 8]) expect(Array.from(bwd[i]!).every((x) => x === 0)).toBe(true)
    })
  })

  it("fused cross-entropy: a vocabulary shard (vocabStart ≠ 0), ignored targets, many chunks", () => {
    const [N, D, V, start, chunk] = [150, 64, 1000, 500, 128]
    const h = rand(N * D)
    const W = rand(V * D, 0.5)
    const tg = Int32Array.from(randInt(N, 0, 2000), (t, i) => (i % 11 === 0 ? -100 : t))
    const rs = Float32Array.from({ length: N }, () => 0.5 + uniform())
    for (const exact of [true, false]) {
      if (exact) process.env.MAGIX_CE_CHUNK = "exact"
      try {
        compare(
          "ce_fwd",
          (dt) => ({
            bufs: [c(N * D, h), c(V * D, W), i32(tg), s32(N), s32(N), s32(N)],
            args: [dt, N, D, V, start, chunk],
          }),
          [3, 4, 5],
          { bf16: 1e-2 },
        )
        for (const dt of [0, 2] as const) {
          const ins = [c(N * D, h), c(V * D, W)]
          const fwd = run(
            cpu,
            "ce_fwd",
            [...(dt === 2 ? rounded(ins) : ins), i32(tg), s32(N), s32(N), s32(N)],
            [0, N, D, V, start, chunk],
          )
          const lse = run(cpu, "ce_lse", [s32(N, fwd[3]!), s32(N, fwd[4]!), s32(N)], [0, N])[2]!
          for (const acc of [0, 1]) {
            const init = acc ? rand(N * D) : undefined
            const bufs = [
              ...(dt === 2 ? rounded(ins) : ins),
              i32(tg),
              s32(N, lse),
              s32(N, rs),
              ...(dt === 2 ? rounded([c(N * D, init)]) : [c(N * D, init)]),
              s32(V * D),
            ]
            const args = [N, D, V, start, chunk, 0.7, acc]
            const got = run(cuda, "ce_bwd", bufs, [dt, ...args], dt === 2)
            const ref = run(cpu, "ce_bwd", bufs, [0, ...args])
            const tol = dt === 0 ? 1e-5 : 1e-2
            expectClose(got[5]!, ref[5]!, tol, `ce_bwd dh dtype ${dt} acc ${acc} exact ${exact}`)
            expectClose(got[6]!, ref[6]!, tol, `ce_bwd dW dtype ${dt} acc ${acc} exact ${exact}`)
          }
        }
      } finally {
        delete process.env.MAGIX_CE_CHUNK
      }
    }
    const m = rand(N, 3)
    const mg = Float32Array.from(m, (x) => x + uniform())
    const sv = Float32Array.from({ length: N }, () => 1 + uniform() * 10)
    compare("ce_rescale", (dt) => ({ bufs: [s32(N, m), s32(N, mg), s32(N, sv)], args: [dt, N] }), [2], {
      bf16: 1e-5,
    })
    compare("ce_lse", (dt) => ({ bufs: [s32(N, m), s32(N, sv), s32(N)], args: [dt, N] }), [2], { bf16: 1e-5 })
    compare(
      "ce_rowloss",
      (dt) => ({ bufs: [s32(N, sv), s32(N, m), i32(tg), s32(N, rs), s32(N)], args: [dt, N] }),
      [4],
      { bf16: 1e-5 },
    )
  })

  it("ce_fused: rows in chunks (automatic, several, one), ignored targets, both row-kernel paths, dh accumulated", () => {
    // V % 4 = 0 takes the float4 row kernels, V odd the scalar ones; both span several bf16 tiles
    // and all 8 slices of the cluster row kernel. Each way of the op runs: whole g (one dh and one
    // dW product) or chunked (MAGIX_CE_FUSED=chunked), each with the cluster row kernel or the
    // one-block-per-row one (MAGIX_CE_ROWS=twopass).
    const ways: Record<string, string>[] = [
      {},
      { MAGIX_CE_ROWS: "twopass" },
      { MAGIX_CE_FUSED: "chunked" },
      { MAGIX_CE_FUSED: "chunked", MAGIX_CE_ROWS: "twopass" },
    ]
    const within = <R>(env: Record<string, string>, f: () => R): R => {
      Object.assign(process.env, env)
      try {
        return f()
      } finally {
        for (const k of Object.keys(env)) delete process.env[k]
      }
    }
    for (const V of [3000, 2999]) {
      const [N, D] = [150, 64]
      const h = rand(N * D)
      const W = rand(V * D, 0.5)
      const tg = Int32Array.from(randInt(N, 0, V), (t, i) => (i % 11 === 0 ? -100 : t))
      const rs = Float32Array.from({ length: N }, () => 0.5 + uniform())
      for (const way of ways)
        within(way, () => {
          for (const rows of [0, 64, 1]) {
            for (const acc of [0, 1]) {
              const init = acc ? rand(N * D) : undefined
              compare(
                "ce_fused",
                (dt) => ({
                  bufs: [
                    c(N * D, h),
                    c(V * D, W),
                    i32(tg),
                    s32(N, rs),
                    s32(N),
                    s32(N),
                    c(N * D, init),
                    s32(V * D),
                  ],
                  args: [dt, N, D, V, rows, 0.7, acc],
                }),
                [4, 5, 6, 7],
                { bf16: 1e-2 },
              )
            }
          }
        })
      // The same numbers as the vocabulary-chunked ops on the GPU (float32), every way.
      const fusedWays = ways.map((way) =>
        within(way, () =>
          run(
            cuda,
            "ce_fused",
            [c(N * D, h), c(V * D, W), i32(tg), s32(N, rs), s32(N), s32(N), c(N * D), s32(V * D)],
            [0, N, D, V, 0, 0.7, 0],
          ),
        ),
      )
      const fused = fusedWays[0]!
      const fwd = run(
        cuda,
        "ce_fwd",
        [c(N * D, h), c(V * D, W), i32(tg), s32(N), s32(N), s32(N)],
        [0, N, D, V, 0, 512],
      )
      const lse = run(cuda, "ce_lse", [s32(N, fwd[3]!), s32(N, fwd[4]!), s32(N)], [0, N])[2]!
      const loss = run(
        cuda,
        "ce_rowloss",
        [s32(N, lse), s32(N, fwd[5]!), i32(tg), s32(N, rs), s32(N)],
        [0, N],
      )[4]!
      const bwd = run(
        cuda,
        "ce_bwd",
        [c(N * D, h), c(V * D, W), i32(tg), s32(N, lse), s32(N, rs), c(N * D), s32(V * D)],
        [0, N, D, V, 0, 512, 0.7, 0],
      )
      expectClose(fused[4]!, lse, 1e-5, `ce_fused lse V ${V}`)
      expectClose(fused[5]!, loss, 1e-5, `ce_fused rowLoss V ${V}`)
      expectClose(fused[6]!, bwd[5]!, 1e-5, `ce_fused dh V ${V}`)
      expectClose(fused[7]!, bwd[6]!, 1e-5, `ce_fused dW V ${V}`)
      for (const [w, other] of fusedWays.entries())
        for (const i of [4, 5, 6, 7])
          expectClose(other[i]!, fused[i]!, 1e-5, `ce_fused way ${w} buffer ${i} V ${V}`)
    }
  })

  it("adamw: five fused steps with clipping, decay and a warmup-cosine schedule; a skipped non-finite step", () => {
    const sizes = [4000, 1, 1027, 70000]
    const p0 = sizes.map((n) => rand(n))
    const grads = [0, 1, 2, 3, 4].map(() => sizes.map((n) => rand(n, 3)))
    const wd = [0.1, 0, 0.01, 0.05]
    const schedule = [2, 0, 1e-2, 2, 10, 1e-3] // kind, init, peak, warmup, decaySteps, end
    const stepOn = (be: NativeBackend) => {
      const code = be.opNames().indexOf("adamw")
      const upload = (a: Float32Array | Float64Array) => {
        const id = be.alloc(0, a.byteLength)
        be.write(id, 0, a)
        return id
      }
      const state = upload(new Float64Array(8))
      const norm = upload(new Float64Array(1))
      const tensors = sizes.map((n, i) => ({
        p: upload(Float32Array.from(p0[i]!)),
        g: upload(new Float32Array(n)),
        m: upload(new Float32Array(n)),
        v: upload(new Float32Array(n)),
      }))
      const args = [
        0,
        sizes.length,
        0.9,
        0.95,
        1e-8,
        1.0,
        1,
        ...schedule,
        ...sizes.flatMap((n, i) => [n, wd[i]!]),
      ]
      const bufs = [state, norm, ...tensors.flatMap((t) => [t.p, t.g, t.m, t.v])]
      for (let s = 0; s < 6; s++) {
        const g = grads[Math.min(s, 4)]!
        let sq = 0
        tensors.forEach((t, i) => {
          be.write(t.g, 0, g[i]!)
          for (const x of g[i]!) sq += x * x
        })
        // Step 3 is non-finite: skipped and counted.
        be.write(norm, 0, Float64Array.of(s === 3 ? Number.POSITIVE_INFINITY : sq))
        be.exec(code, bufs, args)
      }
      const read32 = (id: number, n: number) => new Float32Array(be.read(id, 0, n * 4).buffer.slice(0))
      const out = {
        state: Array.from(new Float64Array(be.read(state, 0, 64).buffer.slice(0))),
        p: tensors.map((t, i) => read32(t.p, sizes[i]!)),
        m: tensors.map((t, i) => read32(t.m, sizes[i]!)),
        v: tensors.map((t, i) => read32(t.v, sizes[i]!)),
      }
      for (const id of bufs) be.free(id)
      return out
    }
    const got = stepOn(cuda)
    const ref = stepOn(cpu)
    expect(got.state[0]).toBe(5)
    expect(got.state[2]).toBe(1)
    expectClose(got.state, ref.state, 1e-12, "adamw state")
    for (let i = 0; i < sizes.length; i++) {
      expectClose(got.p[i]!, ref.p[i]!, 1e-5, `adamw p ${i}`)
      expectClose(got.m[i]!, ref.m[i]!, 1e-5, `adamw m ${i}`)
      expectClose(got.v[i]!, ref.v[i]!, 1e-5, `adamw v ${i}`)
    }
  })

  it("out of memory is a typed error with the request, the free bytes and the largest allocations", () => {
    const big = cuda.alloc(0, 2 ** 30)
    try {
      let caught: unknown
      try {
        cuda.alloc(0, 2 ** 50)
      } catch (e) {
        caught = e
      }
      const raw = caught as Error & { code?: string; free?: number; largest?: string; requested?: number }
      expect(raw.code).toBe("OUT_OF_MEMORY")
      expect(raw.requested).toBe(2 ** 50)
      expect(raw.free).toBeGreaterThan(0)
      expect(raw.largest).toContain("1024 MiB")
      const typed = translateNativeError(caught) as { _tag?: string; free?: number; largest?: string }
      expect(typed._tag).toBe("DeviceOutOfMemory")
      expect(typed.largest).toContain("1024 MiB")
      // The allocator is still usable afterwards.
      const small = cuda.alloc(0, 1 << 20)
      cuda.free(small)
    } finally {
      cuda.free(big)
    }
  })

  it("event timing ops measure queued work", () => {
    const code = (n: string) => cuda.opNames().indexOf(n)
    const n = 1 << 22
    const a = cuda.alloc(0, n * 4)
    const out = cuda.alloc(0, 8)
    cuda.exec(code("event_record"), [], [0, 0])
    cuda.exec(code("fill"), [a], [0, n, 1])
    cuda.exec(code("event_record"), [], [0, 1])
    cuda.exec(code("event_elapsed"), [out], [0, 0, 1])
    const ms = new Float64Array(cuda.read(out, 0, 8).buffer.slice(0))[0]!
    expect(ms).toBeGreaterThan(0)
    cuda.free(a)
    cuda.free(out)
  })
})

describe.skipIf(gpus === 0)("NCCL collectives equal the in-process ones", () => {
  const groups = [1, ...(gpus > 1 ? [gpus] : [])]
  for (const k of groups)
    it(`a group of ${k} GPU${k > 1 ? "s" : ""}`, () => {
      const addon = loadNative()
      const cuda = addon.createCuda(k)
      const cpu = addon.createCpu(k)
      try {
        const devices = Array.from({ length: k }, (_, i) => i)
        const comm = cuda.createCommunicator(devices)
        const code = (be: NativeBackend, n: string) => be.opNames().indexOf(n)
        const place = (be: NativeBackend, data: ArrayBufferView[]) =>
          data.map((d, r) => {
            const id = be.alloc(r, Math.max(4, d.byteLength))
            be.write(id, 0, d)
            return id
          })
        const read32 = (be: NativeBackend, ids: number[], n: number) =>
          ids.map((id) => Array.from(new Float32Array(be.read(id, 0, n * 4).buffer.slice(0))))
        const n = 1000
        const inputs = devices.map(() => rand(n))
        for (const id of [comm, 0]) {
          for (const op of [0, 1]) {
            // float32: the same bits as the CPU's rank-order reduction (up to summation order for k > 2)
            const g = place(cuda, inputs)
            const c2 = place(cpu, inputs)
            cuda.exec(code(cuda, "all_reduce"), g, [0, n, op, id])
            cpu.exec(code(cpu, "all_reduce"), c2, [0, n, op, 0])
            const got = read32(cuda, g, n)
            const ref = read32(cpu, c2, n)
            for (let r = 0; r < k; r++)
              expectClose(got[r]!, ref[r]!, 1e-6, `all_reduce f32 op ${op} rank ${r}`)
            for (let r = 1; r < k; r++) expect(got[r]).toEqual(got[0])
            // bfloat16 against float32 on the rounded inputs
            const gb = place(
              cuda,
              inputs.map((x) => toBf16(x)),
            )
            const cb = place(
              cpu,
              inputs.map((x) => roundBf16(x)),
            )
            cuda.exec(code(cuda, "all_reduce"), gb, [2, n, op, id])
            cpu.exec(code(cpu, "all_reduce"), cb, [0, n, op, 0])
            const refB = read32(cpu, cb, n)
            for (let r = 0; r < k; r++) {
              const bytes = cuda.read(gb[r]!, 0, n * 2)
              const gotB = fromBf16(
                new Uint16Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + n * 2)),
              )
              expectClose(gotB, refB[r]!, 1e-2, `all_reduce bf16 op ${op} rank ${r}`)
            }
            for (const x of [...g, ...gb]) cuda.free(x)
            for (const x of [...c2, ...cb]) cpu.free(x)
          }
          // all_gather: out_r[j·n + i] = in_j[i]
          const gin = place(cuda, inputs)
          const gout = place(
            cuda,
            devices.map(() => new Float32Array(n * k).fill(Number.NaN)),
          )
          cuda.exec(code(cuda, "all_gather"), [...gin, ...gout], [4, k, n, id])
          for (const row of read32(cuda, gout, n * k))
            expect(row).toEqual(inputs.flatMap((x) => Array.from(x)))
          // reduce_scatter: out_r[i] = Σ_j in_j[r·n + i]
          const big = devices.map(() => rand(n * k))
          const rin = place(cuda, big)
          const rout = place(
            cuda,
            devices.map(() => new Float32Array(n).fill(Number.NaN)),
          )
          const cin = place(cpu, big)
          const cout = place(
            cpu,
            devices.map(() => new Float32Array(n)),
          )
          cuda.exec(code(cuda, "reduce_scatter"), [...rin, ...rout], [0, k, n, 0, id])
          cpu.exec(code(cpu, "reduce_scatter"), [...cin, ...cout], [0, k, n, 0, 0])
          const rg = read32(cuda, rout, n)
          const rc = read32(cpu, cout, n)
          for (let r = 0; r < k; r++) expectClose(rg[r]!, rc[r]!, 1e-6, `reduce_scatter rank ${r}`)
          // broadcast from the last rank
          const bids = place(cuda, inputs)
          cuda.exec(code(cuda, "broadcast"), bids, [4, n, k - 1, id])
          for (const row of read32(cuda, bids, n)) expect(row).toEqual(Array.from(inputs[k - 1]!))
          for (const x of [...gin, ...gout, ...rin, ...rout, ...bids]) cuda.free(x)
          for (const x of [...cin, ...cout]) cpu.free(x)
        }
        cuda.destroyCommunicator(comm)
      } finally {
        cuda.dispose()
        cpu.dispose()
      }
    })
})
