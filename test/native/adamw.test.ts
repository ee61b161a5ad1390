/**
 * The fused AdamW pass against a TypeScript transcription of OPS.md: several tensors (one without
 * weight decay), global-norm clipping on and off, every schedule kind as optax computes it, and
 * non-finite gradient norms skipped and counted.
 */
import { afterAll, describe, expect, it } from "vitest"
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
