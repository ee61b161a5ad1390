/**
 * Flash-style attention against a direct TypeScript softmax: causal, grouped-query, sliding window,
 * key mask, query offset, queries with no visible key, sMax > S, and shapes spanning several
 * blocks of queries and keys. The backward pass against finite differences in float64.
 */
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

interface Config {
  B: number
  T: number
  S: number
  Hq: number
  Hkv: number
  hd: number
  causal?: boolean
  window?: number
  qOffset?: number
  sMax?: number
  /** keyMask [B, sMax]; absent means every key may be attended. */
  mask?: (b: number, s: number) => boolean
}

const sMaxOf = (c: Config) => c.sMax ?? c.S
const sizes = (c: Config) => ({
  q: c.B * c.T * c.Hq * c.hd,
  kv: c.B * sMaxOf(c) * c.Hkv * c.hd,
  lse: c.B * c.Hq * c.T,
})
const args = (c: Config, dtype: FloatDtype) => [
  dtype,
  c.B,
  c.T,
  c.S,
  c.Hq,
  c.Hkv,
  c.hd,
  1 / Math.sqrt(c.hd),
  c.causal ? 1 : 0,
  c.window ?? 0,
  c.qOffset ?? 0,
  c.mask ? 1 : 0,
  sMaxOf(c),
]
const maskBytes = (c: Config) =>
  Array.from({ length: c.B * sMaxOf(c) }, (_, i) =>
    c.mask!(Math.floor(i / sMaxOf(c)), i % sMaxOf(c)) ? 1 : 0,
  )

const visible = (c: Config, b: number, t: number, s: number) => {
  const qpos = (c.qOffset ?? 0) + t
  return (!c.mask || c.mask(b, s)) && (!c.causal || s <= qpos) && (!c.window || qpos - s < c.window)
}

const reference = (c: Config, q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>) => {
  const { q: nq, lse: nl } = sizes(c)
  const o = new Float64Array(nq)
  const lse = new Float64Array(nl)
  const scale = 1 / Math.sqrt(c.hd)
  const sm = sMaxOf(c)
  for (let b = 0; b < c.B; b++)
    for (let h = 0; h < c.Hq; h++) {
      const hk = Math.floor(h / (c.Hq / c.Hkv))
      for (let t = 0; t < c.T; t++) {
        const qb = ((b * c.T + t) * c.Hq + h) * c.hd
        const scores: Array<[number, number]> = []
        for (let s = 0; s < c.S; s++) {
          if (!visible(c, b, t, s)) continue
          const kb = ((b * sm + s) * c.Hkv + hk) * c.hd
          let d = 0
          for (let e = 0; e < c.hd; e++) d += q[qb + e]! * k[kb + e]!
          scores.push([s, scale * d])
        }
        const m = Math.max(...scores.map(([, x]) => x))
        const z = scores.reduce((acc, [, x]) => acc + Math.exp(x - m), 0)
        lse[(b * c.Hq + h) * c.T + t] = scores.length ? m + Math.log(z) : Number.NEGATIVE_INFINITY
        for (const [s, x] of scores) {
          const p = Math.exp(x - m) / z
          const vb = ((b * sm + s) * c.Hkv + hk) * c.hd
          for (let e = 0; e < c.hd; e++) o[qb + e]! += p * v[vb + e]!
        }
      }
    }
  return { o, lse }
}

/** Inputs with rows of k and v past S set to `pad` (NaN shows they are never read). */
const inputs = (c: Config, rng: Rng, pad = Number.NaN) => {
  const n = sizes(c)
  const kv = () => {
    const x = rng.uniform(n.kv)
    for (let i = 0; i < n.kv; i++) if (Math.floor(i / (c.Hkv * c.hd)) % sMaxOf(c) >= c.S) x[i] = pad
    return x
  }
  return { q: rng.uniform(n.q), k: kv(), v: kv() }
}

const forward = (
  c: Config,
  dtype: FloatDtype,
  q: ArrayLike<number>,
  k: ArrayLike<number>,
  v: ArrayLike<number>,
) => {
  const n = sizes(c)
  const bufs = [cpu.float(q, dtype), cpu.float(k, dtype), cpu.float(v, dtype)]
  const o = cpu.filled(n.q, dtype, Number.NaN)
  const lse = cpu.filled(n.lse, dtype, Number.NaN)
  cpu.exec("attention_fwd", [...bufs, o, lse, ...(c.mask ? [cpu.uint8(maskBytes(c))] : [])], args(c, dtype))
  return { bufs, o, lse, out: cpu.read(o, n.q, dtype), outLse: cpu.read(lse, n.lse, dtype) }
}

const noKeyForFirstQuery = (b: number, s: number) => !(b === 0 && s === 0)
const configs: Array<[string, Config]> = [
  ["plain", { B: 2, T: 5, S: 7, Hq: 2, Hkv: 2, hd: 8 }],
  ["causal with a query offset", { B: 2, T: 4, S: 9, Hq: 2, Hkv: 1, hd: 4, causal: true, qOffset: 5 }],
  ["grouped-query, causal", { B: 1, T: 6, S: 6, Hq: 6, Hkv: 2, hd: 4, causal: true }],
  ["sliding window, causal", { B: 2, T: 7, S: 7, Hq: 2, Hkv: 1, hd: 4, causal: true, window: 3 }],
  ["sliding window, not causal", { B: 1, T: 6, S: 8, Hq: 2, Hkv: 2, hd: 4, window: 2, qOffset: 2 }],
  [
    "key mask with a query that sees no key",
    { B: 2, T: 5, S: 6, Hq: 2, Hkv: 1, hd: 4, causal: true, mask: noKeyForFirstQuery },
  ],
  ["a batch whose keys are all masked", { B: 2, T: 3, S: 4, Hq: 2, Hkv: 2, hd: 4, mask: (b) => b === 1 }],
  ["sMax > S", { B: 2, T: 4, S: 5, Hq: 4, Hkv: 2, hd: 4, causal: true, qOffset: 1, sMax: 9 }],
]
const large: Array<[string, Config]> = [
  ["several blocks, causal, GQA", { B: 2, T: 70, S: 150, Hq: 4, Hkv: 2, hd: 16, causal: true, qOffset: 80 }],
  [
    "several blocks, window and mask",
    {
      B: 1,
      T: 100,
      S: 130,
      Hq: 2,
      Hkv: 1,
      hd: 8,
      causal: true,
      window: 40,
      qOffset: 30,
      sMax: 140,
      mask: (_, s) => s % 7 !== 3,
    },
  ],
]

describe("attention forward (float32 against the reference)", () => {
  it.each([...configs, ...large])("%s", (_, c) => {
    const rng = new Rng(21)
    const { q, k, v } = inputs(c, rng)
    const [q32, k32, v32] = [f32(q), f32(k), f32(v)]
    const { out, outLse } = forward(c, F32, q32, k32, v32)
    const ref = reference(c, q32, k32, v32)
    expect(relErr(out, ref.o)).toBeLessThan(1e-5)
    const finite = [...ref.lse.keys()].filter((i) => Number.isFinite(ref.lse[i]!))
    expect(
      relErr(
        finite.map((i) => outLse[i]!),
        finite.map((i) => ref.lse[i]!),
      ),
    ).toBeLessThan(1e-5)
    // A query with no visible key: o = 0 and lse = −∞ exactly.
    for (let i = 0; i < ref.lse.length; i++)
      if (!Number.isFinite(ref.lse[i]!)) expect(outLse[i]).toBe(Number.NEGATIVE_INFINITY)
  })

  it("the no-visible-key cases do occur", () => {
    for (const c of [configs[5]![1], configs[6]![1]]) {
      const { q, k, v } = inputs(c, new Rng(1))
      expect(reference(c, q, k, v).lse.some((x) => x === Number.NEGATIVE_INFINITY)).toBe(true)
    }
  })
})

describe("attention backward (float64, finite differences of Σ o·G)", () => {
  const check = (c: Config, samples: number) => {
    const rng = new Rng(33)
    const n = sizes(c)
    const { q, k, v } = inputs(c, rng, 0.5)
    const G = rng.uniform(n.q)
    const f = forward(c, F64, q, k, v)
    const mask = c.mask ? [cpu.uint8(maskBytes(c))] : []
    const loss = ([qs, ks, vs]: ReadonlyArray<Float64Array>) => {
      f.bufs.forEach((id, i) => cpu.write(id, [qs, ks, vs][i]!, F64))
      cpu.exec("attention_fwd", [...f.bufs, f.o, f.lse, ...mask], args(c, F64))
      return dot(cpu.read(f.o, n.q, F64), G)
    }
    loss([q, k, v])
    // dk and dv start at 0: rows past S must stay untouched, matching their zero gradient.
    const [dq, dk, dv] = [
      cpu.filled(n.q, F64, Number.NaN),
      cpu.filled(n.kv, F64, 0),
      cpu.filled(n.kv, F64, 0),
    ]
    cpu.exec("attention_bwd", [...f.bufs, f.o, f.lse, cpu.float(G, F64), dq, dk, dv, ...mask], args(c, F64))
    const grads = [cpu.read(dq, n.q, F64), cpu.read(dk, n.kv, F64), cpu.read(dv, n.kv, F64)]
    for (const g of grads) expect(g.every(Number.isFinite)).toBe(true)
    expectGradients(loss, [q, k, v], grads, rng, { samples })
  }
  it.each(configs)("%s", (_, c) => check(c, 400))
  it.each(large)("%s (sampled elements)", (_, c) => check(c, 60))
})

describe("attention backward in float32", () => {
  it.each(large)("%s: matches float64 and writes dk, dv only for the first S rows", (_, c) => {
    const rng = new Rng(8)
    const n = sizes(c)
    const { q, k, v } = inputs(c, rng)
    const G = f32(rng.uniform(n.q))
    const run = (dtype: FloatDtype) => {
      const f = forward(c, dtype, q, k, v)
      const [dq, dk, dv] = [
        cpu.filled(n.q, dtype, Number.NaN),
        cpu.filled(n.kv, dtype, 7),
        cpu.filled(n.kv, dtype, 7),
      ]
      const mask = c.mask ? [cpu.uint8(maskBytes(c))] : []
      cpu.exec(
        "attention_bwd",
        [...f.bufs, f.o, f.lse, cpu.float(G, dtype), dq, dk, dv, ...mask],
        args(c, dtype),
      )
      return [cpu.read(dq, n.q, dtype), cpu.read(dk, n.kv, dtype), cpu.read(dv, n.kv, dtype)]
    }
    const g32 = run(F32)
    const g64 = run(F64)
    const held = (i: number) => Math.floor(i / (c.Hkv * c.hd)) % sMaxOf(c) < c.S
    for (let j = 0; j < 3; j++) {
      const keep = [...g64[j]!.keys()].filter((i) => j === 0 || held(i))
      expect(
        relErr(
          keep.map((i) => g32[j]![i]!),
          keep.map((i) => g64[j]![i]!),
        ),
      ).toBeLessThan(1e-5)
      if (j > 0) for (let i = 0; i < n.kv; i++) if (!held(i)) expect(g32[j]![i]).toBe(7)
    }
  })
})

describe("attention argument checks", () => {
  const c: Config = { B: 1, T: 4, S: 4, Hq: 4, Hkv: 2, hd: 8 }
  const n = sizes(c)
  const [q, k, v, o, lse] = [n.q, n.kv, n.kv, n.q, n.lse].map((m) => cpu.filled(m, F32, 0.1))
  const fwd = (over: Partial<Config>, mask = false, bufs = [q!, k!, v!, o!, lse!]) => {
    const a = args({ ...c, ...over }, F32)
    if (mask) a[11] = 1
    cpu.exec("attention_fwd", bufs, a)
  }
  it("accepts the valid call", () => fwd({}))
  it("rejects mismatched heads", () => {
    expectInvalid(() => fwd({ Hq: 3 }), /multiple of KV heads/)
    expectInvalid(() => fwd({ Hkv: 0 }), /multiple of KV heads/)
  })
  it("rejects short buffers, a missing mask and S > sMax", () => {
    expectInvalid(() => fwd({ T: 5 }), /buffer 0/)
    expectInvalid(() => fwd({ hd: 16 }), /buffer/)
    expectInvalid(() => fwd({ S: 5, sMax: 5 }), /buffer 1/)
    expectInvalid(() => fwd({}, true), /missing buffer 5/)
    expectInvalid(() => fwd({ S: 5, sMax: 4 }), /sMax/)
    const bwd = [q!, k!, v!, o!, lse!, q!, o!, k!]
    expectInvalid(() => cpu.exec("attention_bwd", bwd, args(c, F32)), /missing buffer 8/)
  })
  it("rejects negative sizes and offsets", () => {
    for (const key of ["B", "T", "S", "hd", "window", "qOffset"] as const)
      expectInvalid(() => fwd({ [key]: -1 }), /non-negative|sMax/)
  })
})
