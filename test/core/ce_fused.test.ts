/**
 * crossEntropyLoss through ce_fused (an unsplit vocabulary with a gradient wanted) against the
 * chunked-vocabulary path (ce_fwd/ce_bwd, forced by splitting the vocabulary over `model`, and
 * taken for a loss with no gradient): the same loss and gradients, on one device and with the rows
 * split over `data`, for a unit cotangent and a scaled one; and no buffer outlives the step.
 */
import { Effect } from "effect"
import { describe, expect, it, vi } from "vitest"
import { valueAndGrad } from "../../src/core/autodiff.ts"
import type { DType } from "../../src/core/dtype.ts"
import type { Engine } from "../../src/core/engine.ts"
import type { Mesh } from "../../src/core/mesh.ts"
import { crossEntropyLoss } from "../../src/core/ops/crossEntropy.ts"
import { scale } from "../../src/core/ops/elementwise.ts"
import { fromHost, type ShardedArray, shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P, type PartitionSpec } from "../../src/core/sharding.ts"
import { mesh, withEngine } from "../helpers.ts"

let seed = 11
const rand = () => {
  seed = (Math.imul(seed, 1103515245) + 12345) >>> 0
  return seed / 2 ** 32 - 0.5
}

const [B, T, D, V] = [4, 6, 5, 12]
const hData = Float64Array.from({ length: B * T * D }, () => 2 * rand())
const wData = Float64Array.from({ length: V * D }, () => 2 * rand())
const targets = Int32Array.from({ length: B * T }, (_, i) =>
  i % 6 === 2 ? -100 : Math.floor((rand() + 0.5) * V),
)
const rowScale = Float64Array.from({ length: B * T }, () => 0.5 + rand())

const typed = (data: ArrayLike<number>, dt: DType) =>
  dt === "int32"
    ? Int32Array.from(data)
    : dt === "float32"
      ? Float32Array.from(data)
      : Float64Array.from(data)

interface Result {
  loss: number
  dh: Float64Array
  dw: Float64Array
  ops: string[]
}

const run = (
  engine: Engine,
  m: Mesh,
  dtype: DType,
  hSpec: PartitionSpec,
  wSpec: PartitionSpec,
  cotangent: number | undefined,
): Result => {
  const ops: string[] = []
  const exec = engine.backend.exec.bind(engine.backend)
  const spy = vi.spyOn(engine.backend, "exec").mockImplementation((op, b, a) => {
    ops.push(op)
    exec(op, b, a)
  })
  const before = engine.backend.stats(0).count
  try {
    const place = (data: ArrayLike<number>, shape: number[], dt: DType, spec: PartitionSpec) =>
      Effect.runSync(fromHost(engine, typed(data, dt), shape, dt, new NamedSharding(m, spec)))
    const out = engine.tidy(() => {
      const tg = place(targets, [B, T], "int32", P())
      const rs = place(rowScale, [B, T], dtype, P())
      const params = { h: place(hData, [B, T, D], dtype, hSpec), w: place(wData, [V, D], dtype, wSpec) }
      const f = (p: { h: ShardedArray; w: ShardedArray }) => {
        const loss = crossEntropyLoss(p.h, p.w, tg, rs)
        return cotangent === undefined ? loss : scale(loss, cotangent)
      }
      const { value, grads } = valueAndGrad(f)(params)
      return {
        loss: Number(shardToHost(value, 0)[0]),
        dh: Float64Array.from(toHost(grads.h) as ArrayLike<number>),
        dw: Float64Array.from(toHost(grads.w) as ArrayLike<number>),
      }
    })
    return { ...out, ops }
  } finally {
    spy.mockRestore()
    expect(engine.backend.stats(0).count, "buffers left after the step").toBe(before)
  }
}

/** The loss alone (no tape): always the chunked-vocabulary path. */
const lossOnly = (engine: Engine, m: Mesh, dtype: DType): number =>
  engine.tidy(() => {
    const place = (data: ArrayLike<number>, shape: number[], dt: DType) =>
      Effect.runSync(fromHost(engine, typed(data, dt), shape, dt, new NamedSharding(m, P())))
    const loss = crossEntropyLoss(
      place(hData, [B, T, D], dtype),
      place(wData, [V, D], dtype),
      place(targets, [B, T], "int32"),
      place(rowScale, [B, T], dtype),
    )
    return Number(shardToHost(loss, 0)[0])
  })

const relErr = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let num = 0
  let den = 0
  for (let i = 0; i < b.length; i++) {
    num += (a[i]! - b[i]!) ** 2
    den += b[i]! ** 2
  }
  return a.length === b.length && den > 0 ? Math.sqrt(num / den) : Number.POSITIVE_INFINITY
}

describe("crossEntropyLoss through ce_fused", () => {
  it.each([
    ["float64", 1e-12],
    ["float32", 1e-5],
  ] as const)("%s: the same loss and gradients as the vocabulary-chunked path", (dtype, tol) =>
    withEngine(4, (e) => {
      const m = mesh([2, 2])
      const one = mesh([1, 1])
      // Reference: the vocabulary split over `model` (ce_fwd, ce_rescale, ce_bwd).
      const ref = run(e, m, dtype, P("data"), P("model"), undefined)
      expect(ref.ops).toContain("ce_bwd")
      expect(ref.ops).not.toContain("ce_fused")
      const cases = [
        { what: "one device", r: run(e, one, dtype, P(), P(), undefined) },
        { what: "rows split over data", r: run(e, m, dtype, P("data"), P(), undefined) },
        { what: "batch and time split", r: run(e, m, dtype, P("data", "model"), P(), undefined) },
      ]
      for (const { what, r } of cases) {
        expect(r.ops, what).toContain("ce_fused")
        expect(r.ops, what).not.toContain("ce_fwd")
        expect(r.ops, what).not.toContain("ce_bwd")
        expect(Math.abs(r.loss - ref.loss) / Math.abs(ref.loss), `${what}: loss`).toBeLessThan(tol)
        expect(relErr(r.dh, ref.dh), `${what}: dh`).toBeLessThan(tol)
        expect(relErr(r.dw, ref.dw), `${what}: dw`).toBeLessThan(tol)
      }
      expect(Math.abs(lossOnly(e, one, dtype) - ref.loss) / Math.abs(ref.loss)).toBeLessThan(tol)
      // A cotangent other than 1 scales both gradients.
      const scaled = run(e, m, dtype, P("data"), P(), 2.5)
      const refScaled = run(e, m, dtype, P("data"), P("model"), 2.5)
      expect(Math.abs(scaled.loss - 2.5 * ref.loss) / Math.abs(ref.loss)).toBeLessThan(tol)
      expect(relErr(scaled.dh, refScaled.dh)).toBeLessThan(tol)
      expect(relErr(scaled.dw, refScaled.dw)).toBeLessThan(tol)
      expect(
        relErr(
          scaled.dh,
          ref.dh.map((x) => 2.5 * x),
        ),
      ).toBeLessThan(tol)
      // Ignored targets get no gradient.
      for (let n = 0; n < B * T; n++)
        if (targets[n]! < 0) for (let d = 0; d < D; d++) expect(cases[0]!.r.dh[n * D + d]).toBe(0)
    }),
  )
})
