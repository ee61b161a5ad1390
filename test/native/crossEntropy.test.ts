/**
 * Cross-entropy fused with the output projection: ce_fwd, ce_rescale, ce_lse and ce_rowloss
 * against TypeScript (ignored targets, targets outside this shard, vocabStart ≠ 0, a chunk that
 * does not divide V, more rows than one block), two vocabulary shards combining to the whole,
 * ce_bwd against a reference and finite differences of the loss in float64, and ce_fused (the
 * forward and backward at once, a chunk of rows at a time) against ce_fwd → ce_lse → ce_rowloss
 * and ce_bwd.
 */
import { afterAll, describe, expect, it } from "vitest"
import {
  Cpu,
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
const rng = new Rng(77)

const [N, D, V, start, chunk] = [70, 12, 45, 20, 16]
// Ignored (−100), held ([20, 65)) and foreign targets.
const targets = Array.from({ length: N }, (_, n) =>
  n % 9 === 0 ? -100 : n % 9 === 1 ? rng.int(0, 20) : rng.int(start, start + V),
)
const rowScale = f32(rng.uniform(N, 0.5, 1.5))
const gradScale = 0.7

const logits = (h: ArrayLike<number>, W: ArrayLike<number>, n: number, v: number) => {
  const out = new Float64Array(n * v)
  for (let i = 0; i < n; i++)
    for (let j = 0; j < v; j++) {
      let s = 0
      for (let d = 0; d < D; d++) s += h[i * D + d]! * W[j * D + d]!
      out[i * v + j] = s
    }
  return out
}

const refForward = (
  h: ArrayLike<number>,
  W: ArrayLike<number>,
  tg: ReadonlyArray<number>,
  v: number,
  vStart: number,
) => {
  const n = tg.length
  const l = logits(h, W, n, v)
  const m = new Float64Array(n)
  const s = new Float64Array(n)
  const z = new Float64Array(n)
  for (let i = 0; i < n; i++) {
    if (tg[i]! < 0) {
      s[i] = 1
      continue
    }
    const row = l.subarray(i * v, (i + 1) * v)
    m[i] = Math.max(...row)
    s[i] = row.reduce((acc, x) => acc + Math.exp(x - m[i]!), 0)
    const t = tg[i]! - vStart
    if (t >= 0 && t < v) z[i] = row[t]!
  }
  return { m, s, z }
}

/** ce_fwd → ce_lse → ce_rowloss on one shard; the buffers and per-row losses. */
const pipeline = (dtype: FloatDtype, h: ArrayLike<number>, W: ArrayLike<number>) => {
  const [hb, wb, tb, rs] = [
    cpu.float(h, dtype),
    cpu.float(W, dtype),
    cpu.int32(targets),
    cpu.float(rowScale, dtype),
  ]
  const [m, s, z, lse, out] = Array.from({ length: 5 }, () => cpu.filled(N, dtype, Number.NaN))
  cpu.exec("ce_fwd", [hb, wb, tb, m!, s!, z!], [dtype, N, D, V, start, chunk])
  cpu.exec("ce_lse", [m!, s!, lse!], [dtype, N])
  cpu.exec("ce_rowloss", [lse!, z!, tb, rs, out!], [dtype, N])
  const read = (id: number) => cpu.read(id, N, dtype)
  return {
    hb,
    wb,
    tb,
    rs,
    lse: lse!,
    m: read(m!),
    s: read(s!),
    z: read(z!),
    lseValues: read(lse!),
    rowLoss: read(out!),
  }
}

describe("cross-entropy forward (float32 against the reference)", () => {
  const h = f32(rng.uniform(N * D, -2, 2))
  const W = f32(rng.uniform(V * D, -2, 2))
  const ref = refForward(h, W, targets, V, start)
  const run = pipeline(F32, h, W)

  it("ce_fwd: running max, rescaled sum and target logit", () => {
    expect(relErr(run.m, ref.m)).toBeLessThan(1e-5)
    expect(relErr(run.s, ref.s)).toBeLessThan(1e-5)
    expect(relErr(run.z, ref.z)).toBeLessThan(1e-5)
    targets.forEach((t, n) => {
      if (t < 0) expect([run.m[n], run.s[n], run.z[n]]).toEqual([0, 1, 0])
      else if (t < start) expect(run.z[n]).toBe(0)
    })
  })

  it("ce_lse and ce_rowloss", () => {
    const lse = ref.m.map((m, n) => m + Math.log(ref.s[n]!))
    expect(relErr(run.lseValues, lse)).toBeLessThan(1e-5)
    const loss = targets.map((t, n) => (t >= 0 ? rowScale[n]! * (lse[n]! - ref.z[n]!) : 0))
    expect(relErr(run.rowLoss, loss)).toBeLessThan(1e-5)
  })

  it("ce_rescale: s·exp(m − mGlobal)", () => {
    const [m, mg, s] = [f32(rng.uniform(N, -3, 3)), f32(rng.uniform(N, 3, 4)), f32(rng.uniform(N, 1, 9))]
    const sb = cpu.float(s, F32)
    cpu.exec("ce_rescale", [cpu.float(m, F32), cpu.float(mg, F32), sb], [F32, N])
    expect(
      relErr(
        cpu.read(sb, N, F32),
        s.map((x, n) => x * Math.exp(m[n]! - mg[n]!)),
      ),
    ).toBeLessThan(1e-5)
  })

  it("two vocabulary shards combine (max, rescale, sum) to the whole vocabulary", () => {
    const whole = refForward(h, W, targets, V, start)
    const split = 25
    const shards = [
      { v0: 0, v: split },
      { v0: split, v: V - split },
    ].map(({ v0, v }) => {
      const [m, s, z] = [cpu.filled(N, F32, 0), cpu.filled(N, F32, 0), cpu.filled(N, F32, 0)]
      const Ws = W.subarray(v0 * D, (v0 + v) * D)
      cpu.exec(
        "ce_fwd",
        [cpu.float(h, F32), cpu.float(Ws, F32), cpu.int32(targets), m, s, z],
        [F32, N, D, v, start + v0, 7],
      )
      return { m, s, z }
    })
    const m0 = cpu.read(shards[0]!.m, N, F32)
    const m1 = cpu.read(shards[1]!.m, N, F32)
    const mg = cpu.float(
      m0.map((x, n) => Math.max(x, m1[n]!)),
      F32,
    )
    for (const sh of shards) cpu.exec("ce_rescale", [sh.m, mg, sh.s], [F32, N])
    const sSum = cpu.filled(N, F32, 0)
    const zSum = cpu.filled(N, F32, 0)
    cpu.exec("add", [shards[0]!.s, shards[1]!.s, sSum], [F32, N])
    cpu.exec("add", [shards[0]!.z, shards[1]!.z, zSum], [F32, N])
    const lse = cpu.filled(N, F32, 0)
    cpu.exec("ce_lse", [mg, sSum, lse], [F32, N])
    const kept = targets.flatMap((t, n) => (t >= 0 ? [n] : []))
    const lseRef = kept.map((n) => whole.m[n]! + Math.log(whole.s[n]!))
    const got = cpu.read(lse, N, F32)
    expect(
      relErr(
        kept.map((n) => got[n]!),
        lseRef,
      ),
    ).toBeLessThan(1e-5)
    const zGot = cpu.read(zSum, N, F32)
    expect(
      relErr(
        kept.map((n) => zGot[n]!),
        kept.map((n) => whole.z[n]!),
      ),
    ).toBeLessThan(1e-5)
  })
})

describe("ce_bwd", () => {
  const bwd = (
    dtype: FloatDtype,
    run: ReturnType<typeof pipeline>,
    dh: number,
    dW: number,
    accumulate: number,
  ) =>
    cpu.exec(
      "ce_bwd",
      [run.hb, run.wb, run.tb, run.lse, run.rs, dh, dW],
      [dtype, N, D, V, start, chunk, gradScale, accumulate],
    )

  it("matches the reference gradient and accumulates dh (float32)", () => {
    const h = f32(rng.uniform(N * D, -2, 2))
    const W = f32(rng.uniform(V * D, -2, 2))
    const run = pipeline(F32, h, W)
    const l = logits(h, W, N, V)
    const dhRef = new Float64Array(N * D)
    const dWRef = new Float64Array(V * D)
    targets.forEach((t, n) => {
      if (t < 0) return
      for (let j = 0; j < V; j++) {
        const g =
          gradScale * rowScale[n]! * (Math.exp(l[n * V + j]! - run.lseValues[n]!) - (j === t - start ? 1 : 0))
        for (let d = 0; d < D; d++) {
          dhRef[n * D + d]! += g * W[j * D + d]!
          dWRef[j * D + d]! += g * h[n * D + d]!
        }
      }
    })
    const [dh, dW] = [cpu.filled(N * D, F32, Number.NaN), cpu.filled(V * D, F32, Number.NaN)]
    bwd(F32, run, dh, dW, 0)
    const once = cpu.read(dh, N * D, F32)
    expect(relErr(once, dhRef)).toBeLessThan(1e-5)
    expect(relErr(cpu.read(dW, V * D, F32), dWRef)).toBeLessThan(1e-5)
    for (let i = 0; i < N * D; i++) if (targets[Math.floor(i / D)]! < 0) expect(once[i]).toBe(0)
    bwd(F32, run, dh, dW, 1)
    expect(
      relErr(
        cpu.read(dh, N * D, F32),
        dhRef.map((x) => 2 * x),
      ),
    ).toBeLessThan(1e-5)
    expect(relErr(cpu.read(dW, V * D, F32), dWRef)).toBeLessThan(1e-5)
  })

  it("is the gradient of gradScale·Σ rowloss (float64, finite differences)", () => {
    const h = rng.uniform(N * D, -2, 2)
    const W = rng.uniform(V * D, -2, 2)
    const loss = ([hs, ws]: ReadonlyArray<Float64Array>) =>
      gradScale * pipeline(F64, hs!, ws!).rowLoss.reduce((a, b) => a + b, 0)
    const run = pipeline(F64, h, W)
    const [dh, dW] = [cpu.filled(N * D, F64, Number.NaN), cpu.filled(V * D, F64, Number.NaN)]
    bwd(F64, run, dh, dW, 0)
    expectGradients(loss, [h, W], [cpu.read(dh, N * D, F64), cpu.read(dW, V * D, F64)], rng, { samples: 150 })
  })
})

describe("cross-entropy argument checks", () => {
  it("rejects short buffers, negative sizes and a zero chunk", () => {
    const [h, W, t] = [cpu.filled(N * D, F32, 1), cpu.filled(V * D, F32, 1), cpu.int32(targets)]
    const [m, s, z] = [cpu.filled(N, F32, 0), cpu.filled(N, F32, 0), cpu.filled(N, F32, 0)]
    const fwd = (a: number[]) => cpu.exec("ce_fwd", [h, W, t, m, s, z], [F32, ...a])
    fwd([N, D, V, start, chunk])
    fwd([N, D, V, start, 1e9])
    expectInvalid(() => fwd([N, D, V + 1, start, chunk]), /buffer 1/)
    expectInvalid(() => fwd([N + 1, D, V, start, chunk]), /buffer 0/)
    expectInvalid(() => fwd([N, -D, V, start, chunk]), /non-negative/)
    expectInvalid(() => fwd([N, D, V, start, 0]), /chunk/)
    expectInvalid(() => cpu.exec("ce_lse", [m, s, h], [F32, N * D]), /buffer 0/)
    expectInvalid(() => cpu.exec("ce_rowloss", [m, s, t, m, z], [F32, -1]), /non-negative/)
    expectInvalid(() => cpu.exec("ce_rescale", [m, s, z], [F32, N + 1]), /buffer/)
    const [dh, dW] = [cpu.filled(N * D, F32, 0), cpu.filled(V * D - 1, F32, 0)]
    expectInvalid(
      () => cpu.exec("ce_bwd", [h, W, t, m, s, dh, dW], [F32, N, D, V, start, chunk, 1, 0]),
      /buffer 6/,
    )
  })
})

describe("ce_fused (rows in chunks) against ce_fwd → ce_lse → ce_rowloss and ce_bwd", () => {
  // An unsplit vocabulary: every target held or ignored; N not a multiple of the chunk.
  const tgFull = Array.from({ length: N }, (_, n) => (n % 7 === 3 ? -100 : rng.int(0, V)))
  const rsVar = f32(rng.uniform(N, 0.25, 2))

  const reference = (
    dtype: FloatDtype,
    h: ArrayLike<number>,
    W: ArrayLike<number>,
    dhInit?: ArrayLike<number>,
  ) => {
    const [hb, wb, tb, rs] = [
      cpu.float(h, dtype),
      cpu.float(W, dtype),
      cpu.int32(tgFull),
      cpu.float(rsVar, dtype),
    ]
    const [m, s, z, lse, out] = Array.from({ length: 5 }, () => cpu.filled(N, dtype, Number.NaN))
    cpu.exec("ce_fwd", [hb, wb, tb, m!, s!, z!], [dtype, N, D, V, 0, chunk])
    cpu.exec("ce_lse", [m!, s!, lse!], [dtype, N])
    cpu.exec("ce_rowloss", [lse!, z!, tb, rs, out!], [dtype, N])
    const dh = dhInit ? cpu.float(dhInit, dtype) : cpu.filled(N * D, dtype, Number.NaN)
    const dW = cpu.filled(V * D, dtype, Number.NaN)
    cpu.exec("ce_bwd", [hb, wb, tb, lse!, rs, dh, dW], [dtype, N, D, V, 0, chunk, gradScale, dhInit ? 1 : 0])
    return {
      lse: cpu.read(lse!, N, dtype),
      rowLoss: cpu.read(out!, N, dtype),
      dh: cpu.read(dh, N * D, dtype),
      dW: cpu.read(dW, V * D, dtype),
    }
  }

  const fused = (
    dtype: FloatDtype,
    h: ArrayLike<number>,
    W: ArrayLike<number>,
    rows: number,
    dhInit?: ArrayLike<number>,
    n = N,
  ) => {
    const [hb, wb, tb, rs] = [
      cpu.float(h, dtype),
      cpu.float(W, dtype),
      cpu.int32(tgFull.slice(0, n)),
      cpu.float(rsVar.slice(0, n), dtype),
    ]
    const [lse, out] = [cpu.filled(n, dtype, Number.NaN), cpu.filled(n, dtype, Number.NaN)]
    const dh = dhInit ? cpu.float(dhInit, dtype) : cpu.filled(n * D, dtype, Number.NaN)
    const dW = cpu.filled(V * D, dtype, Number.NaN)
    cpu.exec(
      "ce_fused",
      [hb, wb, tb, rs, lse, out, dh, dW],
      [dtype, n, D, V, rows, gradScale, dhInit ? 1 : 0],
    )
    return {
      lse: cpu.read(lse, n, dtype),
      rowLoss: cpu.read(out, n, dtype),
      dh: cpu.read(dh, n * D, dtype),
      dW: cpu.read(dW, V * D, dtype),
    }
  }

  it.each([
    [F32, 1e-5],
    [F64, 1e-12],
  ] as const)(
    "dtype %i: equal within %f for one, several and automatic chunks; ignored rows are 0",
    (dtype, tol) => {
      const h = dtype === F32 ? f32(rng.uniform(N * D, -2, 2)) : rng.uniform(N * D, -2, 2)
      const W = dtype === F32 ? f32(rng.uniform(V * D, -2, 2)) : rng.uniform(V * D, -2, 2)
      const ref = reference(dtype, h, W)
      for (const rows of [1, 16, 64, 0, 10_000]) {
        const got = fused(dtype, h, W, rows)
        const kept = (a: Float64Array) => tgFull.flatMap((t, n) => (t >= 0 ? [a[n]!] : []))
        expect(relErr(kept(got.lse), kept(ref.lse)), `lse rows ${rows}`).toBeLessThan(tol)
        expect(relErr(got.rowLoss, ref.rowLoss), `rowLoss rows ${rows}`).toBeLessThan(tol)
        expect(relErr(got.dh, ref.dh), `dh rows ${rows}`).toBeLessThan(tol)
        expect(relErr(got.dW, ref.dW), `dW rows ${rows}`).toBeLessThan(tol)
        tgFull.forEach((t, n) => {
          if (t >= 0) return
          expect([got.lse[n], got.rowLoss[n]]).toEqual([0, 0])
          for (let d = 0; d < D; d++) expect(got.dh[n * D + d]).toBe(0)
        })
      }
    },
  )

  it("accumulates dh when asked (float64)", () => {
    const h = rng.uniform(N * D, -2, 2)
    const W = rng.uniform(V * D, -2, 2)
    const init = rng.uniform(N * D, -1, 1)
    const ref = reference(F64, h, W, init)
    const got = fused(F64, h, W, 16, init)
    expect(relErr(got.dh, ref.dh)).toBeLessThan(1e-12)
    expect(relErr(got.dW, ref.dW)).toBeLessThan(1e-12)
  })

  it("is the gradient of gradScale·Σ rowLoss (float64, finite differences)", () => {
    const h = rng.uniform(N * D, -2, 2)
    const W = rng.uniform(V * D, -2, 2)
    const loss = ([hs, ws]: ReadonlyArray<Float64Array>) =>
      gradScale * fused(F64, hs!, ws!, 16).rowLoss.reduce((a, b) => a + b, 0)
    const got = fused(F64, h, W, 16)
    expectGradients(loss, [h, W], [got.dh, got.dW], rng, { samples: 150 })
  })

  it("no rows: dW is written as 0; no vocabulary: lse, rowLoss and dh are 0", () => {
    const W = rng.uniform(V * D, -2, 2)
    expect(Array.from(fused(F32, [], W, 0, undefined, 0).dW).every((x) => x === 0)).toBe(true)
    const [hb, tb, rs] = [cpu.float(rng.uniform(N * D), F32), cpu.int32(tgFull), cpu.float(rsVar, F32)]
    const [lse, out, dh, dW] = [
      cpu.filled(N, F32, Number.NaN),
      cpu.filled(N, F32, Number.NaN),
      cpu.filled(N * D, F32, Number.NaN),
      cpu.filled(1, F32, 5),
    ]
    cpu.exec("ce_fused", [hb, dW, tb, rs, lse, out, dh, dW], [F32, N, D, 0, 0, 1, 0])
    for (const [id, n] of [
      [lse, N],
      [out, N],
      [dh, N * D],
    ] as const)
      expect(Array.from(cpu.read(id, n, F32)).every((x) => x === 0)).toBe(true)
  })

  it("rejects short buffers and negative sizes", () => {
    const bufs = () => [
      cpu.filled(N * D, F32, 1),
      cpu.filled(V * D, F32, 1),
      cpu.int32(tgFull),
      cpu.filled(N, F32, 1),
      cpu.filled(N, F32, 0),
      cpu.filled(N, F32, 0),
      cpu.filled(N * D, F32, 0),
      cpu.filled(V * D, F32, 0),
    ]
    const b = bufs()
    cpu.exec("ce_fused", b, [F32, N, D, V, 16, 1, 0])
    expectInvalid(() => cpu.exec("ce_fused", b, [F32, N, D, V + 1, 16, 1, 0]), /buffer 1/)
    expectInvalid(() => cpu.exec("ce_fused", b, [F32, N + 1, D, V, 16, 1, 0]), /buffer 0/)
    expectInvalid(() => cpu.exec("ce_fused", b, [F32, N, D, V, -1, 1, 0]), /non-negative/)
    const short = bufs()
    short[7] = cpu.filled(V * D - 1, F32, 0)
    expectInvalid(() => cpu.exec("ce_fused", short, [F32, N, D, V, 16, 1, 0]), /buffer 7/)
  })
})
