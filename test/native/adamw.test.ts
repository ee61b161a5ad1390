/**
 * The fused AdamW pass against a TypeScript transcription of OPS.md: several tensors (one without
 * weight decay), global-norm clipping on and off, every schedule kind as optax computes it, and
 * non-finite gradient norms skipped and counted. With shadows (an optional shadowDtype argument
 * and one more buffer per tensor): s equals `cast` of the updated p bit for bit, p, m and v are as
 * without, a skipped step leaves s; on the CPU, and on CUDA where a GPU is present.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { loadNative, type NativeBackend } from "../../src/native/index.ts"
import { Cpu, expectInvalid, F32, F64, type FloatDtype, f32, Rng, relErr } from "./helpers.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())

type Schedule = [kind: number, params: [number, number, number, number, number]]
const [b1, b2, eps, maxNorm] = [0.9, 0.95, 1e-8, 1.0]

/** optax's schedules at count c. */
const lrAt = ([kind, s]: Schedule, c: number): number => {
  if (kind === 0) return s[0]
  if (kind === 1) return s[2] <= 0 ? s[0] : s[0] + ((s[1] - s[0]) * Math.min(c, s[2])) / s[2]
  const [init, peak, warmup, decay, end] = s
  if (c < warmup) return init + ((peak - init) * c) / warmup
  const r = Math.min(c - warmup, decay - warmup) / (decay - warmup)
  return end + ((peak - end) * (1 + Math.cos(Math.PI * r))) / 2
}

interface Tensor {
  p: Float64Array
  m: Float64Array
  v: Float64Array
  wd: number
}

/** One call of the op, in float64 with results stored at the dtype's precision. */
const refStep = (
  state: number[],
  normSq: number,
  ts: Tensor[],
  grads: Float64Array[],
  sched: Schedule,
  round: (x: number) => number,
) => {
  const norm = Math.sqrt(normSq)
  state[3] = norm
  if (!Number.isFinite(norm)) {
    state[1]! += 1
    state[2]! += 1
    return
  }
  state[1] = 0
  const c = state[0]!
  const t = c + 1
  const lr = lrAt(sched, c)
  const scale = maxNorm > 0 && norm >= maxNorm ? maxNorm / norm : 1
  const bc1 = 1 - b1 ** t
  const bc2 = 1 - b2 ** t
  ts.forEach((x, i) => {
    for (let j = 0; j < x.p.length; j++) {
      const g = scale * grads[i]![j]!
      const m = b1 * x.m[j]! + (1 - b1) * g
      const v = b2 * x.v[j]! + (1 - b2) * g * g
      x.m[j] = round(m)
      x.v[j] = round(v)
      x.p[j] = round(x.p[j]! - lr * (m / bc1 / (Math.sqrt(v / bc2) + eps) + x.wd * x.p[j]!))
    }
  })
  state[0] = t
  state[4] = lr
}

const schedules: Array<[string, Schedule]> = [
  ["constant", [0, [3e-3, 0, 0, 0, 0]]],
  ["linear", [1, [1e-2, 1e-3, 3, 0, 0]]],
  ["warmup-cosine", [2, [1e-4, 1e-2, 2, 4, 1e-3]]],
]

const adamwArgs = (dtype: FloatDtype, sched: Schedule, ts: ReadonlyArray<Tensor>) => [
  dtype,
  ts.length,
  b1,
  b2,
  eps,
  maxNorm,
  1,
  sched[0],
  ...sched[1],
  ...ts.flatMap((t) => [t.p.length, t.wd]),
]

describe.each([F32, F64])("adamw, dtype %i", (dtype: FloatDtype) => {
  const round = dtype === F32 ? Math.fround : (x: number) => x
  it.each(schedules)("%s schedule: five updates and two skipped steps", (_, sched) => {
    const rng = new Rng(12)
    const ts: Tensor[] = [
      [100, 0.1],
      [33, 0],
      [1000, 0.01],
    ].map(([n, wd]) => ({
      p: f32(rng.uniform(n!)),
      m: f32(rng.uniform(n!, 0, 0.1)),
      v: f32(rng.uniform(n!, 0, 0.01)),
      wd: wd!,
    }))
    const ref = ts.map((t) => ({ ...t, p: t.p.slice(), m: t.m.slice(), v: t.v.slice() }))
    const stateRef = [0, 0, 0, 0, 0, 0, 0, 0]
    const state = cpu.float(stateRef, F64)
    const bufs = ts.flatMap((t) => [
      cpu.float(t.p, dtype),
      cpu.filled(t.p.length, dtype, 0),
      cpu.float(t.m, dtype),
      cpu.float(t.v, dtype),
    ])
    const normSq = cpu.filled(1, F64, 0)
    // Gradient scales: clipped (norm ≈ 10), not clipped (norm ≈ 0.1), two non-finite norms, clipped.
    const plan = [1, 0.01, Number.NaN, Number.POSITIVE_INFINITY, 1, 1, 0.5]
    plan.forEach((k, step) => {
      const grads = ts.map((t) =>
        f32(rng.uniform(t.p.length, -0.5, 0.5).map((g) => g * (Number.isFinite(k) ? k : 1))),
      )
      grads.forEach((g, i) => cpu.write(bufs[4 * i + 1]!, g, dtype))
      const sq = Number.isFinite(k) ? grads.reduce((a, g) => a + g.reduce((s, x) => s + x * x, 0), 0) : k
      cpu.write(normSq, [sq], F64)
      cpu.exec("adamw", [state, normSq, ...bufs], adamwArgs(dtype, sched, ts))
      refStep(stateRef, sq, ref, grads, sched, round)
      const got = cpu.read(state, 8, F64)
      if (step === 3) expect([...got.subarray(0, 3)]).toEqual([2, 2, 2])
      expect([...got.subarray(0, 3)]).toEqual(stateRef.slice(0, 3))
      expect(
        relErr(
          [got[3]!, got[4]!].filter(Number.isFinite),
          [stateRef[3]!, stateRef[4]!].filter(Number.isFinite),
        ),
      ).toBeLessThan(1e-15)
    })
    expect(cpu.read(state, 3, F64)).toEqual(Float64Array.from([5, 0, 2]))
    ts.forEach((t, i) => {
      const n = t.p.length
      expect(relErr(cpu.read(bufs[4 * i]!, n, dtype), ref[i]!.p)).toBeLessThan(1e-6)
      expect(relErr(cpu.read(bufs[4 * i + 2]!, n, dtype), ref[i]!.m)).toBeLessThan(1e-6)
      expect(relErr(cpu.read(bufs[4 * i + 3]!, n, dtype), ref[i]!.v)).toBeLessThan(1e-6)
    })
  })
})

describe("adamw schedules and checks", () => {
  const tensor = () => [
    cpu.filled(4, F32, 1),
    cpu.filled(4, F32, 0.5),
    cpu.filled(4, F32, 0),
    cpu.filled(4, F32, 0),
  ]
  const args = (sched: Schedule, n = 4) => [F32, 1, b1, b2, eps, 0, 1, sched[0], ...sched[1], n, 0]

  it("a linear schedule without transition steps is its init value, as in optax", () => {
    const state = cpu.filled(8, F64, 0)
    cpu.exec("adamw", [state, cpu.float([1], F64), ...tensor()], args([1, [0.25, 0.75, 0, 0, 0]]))
    expect(cpu.read(state, 5, F64)[4]).toBe(0.25)
  })

  it("warmup-cosine at and past the end of its decay is the end value", () => {
    const state = cpu.float([10, 0, 0, 0, 0, 0, 0, 0], F64)
    cpu.exec("adamw", [state, cpu.float([1], F64), ...tensor()], args([2, [0, 1, 2, 6, 0.125]]))
    expect(cpu.read(state, 5, F64)[4]).toBe(0.125)
  })

  it("rejects bad calls before changing anything", () => {
    const state = cpu.float([3, 1, 1, 7, 0.5, 0, 0, 0], F64)
    const t = tensor()
    const before = cpu.read(state, 8, F64)
    const ns = cpu.float([1], F64)
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t], args([3, [0, 0, 0, 0, 0]])), /schedule kind/)
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t], args([0, [1, 0, 0, 0, 0]], 5)), /buffer 2/)
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t], args([0, [1, 0, 0, 0, 0]], -1)), /non-negative/)
    expectInvalid(
      () => cpu.exec("adamw", [state, ns, ...t], args([0, [1, 0, 0, 0, 0]]).slice(0, -1)),
      /missing argument/,
    )
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t.slice(1)], args([0, [1, 0, 0, 0, 0]])), /buffers/)
    expectInvalid(
      () => cpu.exec("adamw", [cpu.filled(7, F64, 0), ns, ...t], args([0, [1, 0, 0, 0, 0]])),
      /buffer 0/,
    )
    expect(cpu.read(state, 8, F64)).toEqual(before)
  })
})

describe("adamw shadows", () => {
  const raw = (id: number, bytes: number) => Array.from(cpu.backend.read(id, 0, bytes))
  const esize = (code: number) => (code === 1 ? 8 : code === 2 ? 2 : 4)

  // float32 parameters with bfloat16 shadows (the GPU's mixed precision) and float64 parameters
  // with float32 shadows.
  it.each([
    [F32, 2],
    [F64, 0],
  ] as const)("dtype %i, shadowDtype %i: s = cast(p) after every step, p, m, v as without", (dtype, sdt) => {
    const rng = new Rng(31)
    const sizes = [37, 1, 4099]
    const init = sizes.map((n) => [
      f32(rng.uniform(n)),
      f32(rng.uniform(n, 0, 0.1)),
      f32(rng.uniform(n, 0, 0.01)),
    ])
    const make = () =>
      init.flatMap(([p, m, v]) => [
        cpu.float(p!, dtype),
        cpu.filled(p!.length, dtype, 0),
        cpu.float(m!, dtype),
        cpu.float(v!, dtype),
      ])
    const plain = make()
    const fused = make()
    // Shadows start as garbage: the first update writes them whole.
    const shadows = sizes.map((n) => {
      const id = cpu.bytes(n * esize(sdt))
      cpu.backend.write(id, 0, new Uint8Array(n * esize(sdt)).fill(0xff))
      return id
    })
    const ts = sizes.map((n, i) => ({
      p: new Float64Array(n),
      m: init[i]![1]!,
      v: init[i]![2]!,
      wd: 0.05 * i,
    }))
    const sched: Schedule = [0, [1e-2, 0, 0, 0, 0]]
    const statePlain = cpu.filled(8, F64, 0)
    const stateFused = cpu.filled(8, F64, 0)
    const normSq = cpu.filled(1, F64, 0)
    const cast = cpu.bytes(Math.max(...sizes) * esize(sdt))
    let shadowBefore: number[][] = []
    for (const [step, k] of [1, 0.01, Number.NaN, 2].entries()) {
      const grads = sizes.map((n) => f32(rng.uniform(n, -1, 1).map((g) => g * (Number.isFinite(k) ? k : 1))))
      grads.forEach((g, i) => {
        cpu.write(plain[4 * i + 1]!, g, dtype)
        cpu.write(fused[4 * i + 1]!, g, dtype)
      })
      cpu.write(
        normSq,
        [Number.isFinite(k) ? grads.reduce((a, g) => a + g.reduce((s, x) => s + x * x, 0), 0) : k],
        F64,
      )
      cpu.exec("adamw", [statePlain, normSq, ...plain], adamwArgs(dtype, sched, ts))
      cpu.exec("adamw", [stateFused, normSq, ...fused, ...shadows], [...adamwArgs(dtype, sched, ts), sdt])
      expect(raw(stateFused, 64)).toEqual(raw(statePlain, 64))
      sizes.forEach((n, i) => {
        for (let j = 0; j < 4; j++)
          expect(
            raw(fused[4 * i + j]!, n * (dtype === F32 ? 4 : 8)),
            `step ${step} tensor ${i} buffer ${j}`,
          ).toEqual(raw(plain[4 * i + j]!, n * (dtype === F32 ? 4 : 8)))
        cpu.exec("cast", [fused[4 * i]!, cast], [dtype, sdt, n])
        expect(raw(shadows[i]!, n * esize(sdt)), `step ${step} shadow ${i}`).toEqual(
          raw(cast, n * esize(sdt)),
        )
      })
      const now = shadows.map((s, i) => raw(s, sizes[i]! * esize(sdt)))
      // The skipped step (a NaN norm) leaves the shadows as they were.
      if (step === 2) expect(now).toEqual(shadowBefore)
      else if (step > 0) expect(now).not.toEqual(shadowBefore)
      shadowBefore = now
    }
  })

  it("rejects bad shadow calls before changing anything", () => {
    const state = cpu.float([3, 1, 1, 7, 0.5, 0, 0, 0], F64)
    const before = cpu.read(state, 8, F64)
    const ns = cpu.float([1], F64)
    const t = [cpu.filled(4, F32, 1), cpu.filled(4, F32, 0.5), cpu.filled(4, F32, 0), cpu.filled(4, F32, 0)]
    const s = cpu.filled(2, F32, 0) // 4 bfloat16
    const args = [F32, 1, b1, b2, eps, 0, 1, 0, 1e-3, 0, 0, 0, 0, 4, 0]
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t, s], [...args, 4]), /shadowDtype/)
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t], [...args, 2]), /buffers/)
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t, s], args), /buffers/)
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t, cpu.filled(1, F32, 0)], [...args, 2]), /buffer 6/)
    expectInvalid(() => cpu.exec("adamw", [state, ns, ...t, s], [...args, 0]), /buffer 6/)
    expect(cpu.read(state, 8, F64)).toEqual(before)
    cpu.exec("adamw", [state, ns, ...t, s], [...args, 2])
    expect(cpu.read(state, 1, F64)[0]).toBe(4)
  })
})

const gpus = (() => {
  try {
    return loadNative().cudaProbe().devices
  } catch {
    return 0
  }
})()

describe.skipIf(gpus === 0)("adamw shadows on CUDA", () => {
  let cuda: NativeBackend
  beforeAll(() => {
    cuda = loadNative().createCuda(1)
  })
  afterAll(() => cuda?.dispose())

  it("s = cast(p) bit for bit, p, m, v as without shadows; a skipped step leaves s", () => {
    const rng = new Rng(41)
    // Odd sizes: scalar tails, a tensor of several tiles, a misaligned-length one.
    const sizes = [3, 4096 * 3 + 5, 1000, 1]
    const upload = (a: ArrayBufferView) => {
      const id = cuda.alloc(0, Math.max(16, a.byteLength))
      cuda.write(id, 0, a)
      return id
    }
    const bytes = (id: number, n: number) => Array.from(cuda.read(id, 0, n))
    const op = (name: string) => cuda.opNames().indexOf(name)
    const init = sizes.map((n) => [0, 1, 2].map(() => Float32Array.from(rng.uniform(n, -1, 1))))
    const make = () =>
      init.flatMap(([p, m, v]) => [
        upload(p!),
        upload(new Float32Array(p!.length)),
        upload(m!.map(Math.abs)),
        upload(v!.map((x) => x * x)),
      ])
    const plain = make()
    const fused = make()
    const shadows = sizes.map((n) => upload(new Uint16Array(n).fill(0xffff)))
    const cast = cuda.alloc(0, 2 * Math.max(...sizes))
    const ids: number[] = [...plain, ...fused, ...shadows, cast]
    try {
      const statePlain = upload(new Float64Array(8))
      const stateFused = upload(new Float64Array(8))
      const normSq = upload(new Float64Array(1))
      ids.push(statePlain, stateFused, normSq)
      const args = [
        F32,
        sizes.length,
        b1,
        b2,
        eps,
        maxNorm,
        1,
        0,
        1e-2,
        0,
        0,
        0,
        0,
        ...sizes.flatMap((n, i) => [n, 0.01 * i]),
      ]
      let before: number[][] = []
      for (const [step, k] of [1, Number.NaN, 3].entries()) {
        sizes.forEach((n, i) => {
          const g = Float32Array.from(rng.uniform(n, -1, 1))
          cuda.write(plain[4 * i + 1]!, 0, g)
          cuda.write(fused[4 * i + 1]!, 0, g)
        })
        cuda.write(normSq, 0, Float64Array.of(k))
        cuda.exec(op("adamw"), [statePlain, normSq, ...plain], args)
        cuda.exec(op("adamw"), [stateFused, normSq, ...fused, ...shadows], [...args, 2])
        expect(bytes(stateFused, 64)).toEqual(bytes(statePlain, 64))
        const now = sizes.map((n, i) => {
          for (let j = 0; j < 4; j++)
            expect(bytes(fused[4 * i + j]!, 4 * n)).toEqual(bytes(plain[4 * i + j]!, 4 * n))
          cuda.exec(op("cast"), [fused[4 * i]!, cast], [0, 2, n])
          const s = bytes(shadows[i]!, 2 * n)
          expect(s, `step ${step} shadow ${i}`).toEqual(bytes(cast, 2 * n))
          return s
        })
        if (step === 1) expect(now).toEqual(before)
        before = now
      }
    } finally {
      for (const id of ids) cuda.free(id)
    }
  })
})
