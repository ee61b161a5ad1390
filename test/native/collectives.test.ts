/**
 * In-process collectives over virtual devices, k = 1, 2, 4: results in rank order, identical
 * bits on every member, against TypeScript (sum rounded to the dtype after each rank, and max).
 */
import { afterAll, describe, expect, it } from "vitest"
import { Cpu, expectInvalid, F32, F64, type FloatDtype, Rng } from "./helpers.ts"

const cpu = new Cpu(4)
afterAll(() => cpu.dispose())
const rng = new Rng(31)
const n = 1000

/** b_0 ⊕ … ⊕ b_{k−1}, left to right, each partial result stored at the dtype's precision. */
const fold = (xs: ReadonlyArray<ArrayLike<number>>, op: number, i: number, dtype: FloatDtype) => {
  const round = dtype === F32 ? Math.fround : (x: number) => x
  let acc = xs[0]![i]!
  for (let r = 1; r < xs.length; r++) acc = round(op === 0 ? acc + xs[r]![i]! : Math.max(acc, xs[r]![i]!))
  return acc
}
const inputs = (k: number, len: number, dtype: FloatDtype) =>
  Array.from({ length: k }, () =>
    dtype === F32 ? Float64Array.from(Float32Array.from(rng.uniform(len))) : rng.uniform(len),
  )

describe.each([1, 2, 4])("collectives over %i devices", (k) => {
  describe.each([F32, F64])("dtype %i", (dtype: FloatDtype) => {
    it.each([
      [0, "sum"],
      [1, "max"],
    ])("all_reduce, op %i (%s)", (op) => {
      const xs = inputs(k, n + 3, dtype)
      const bufs = xs.map((x, r) => cpu.float(x, dtype, r))
      cpu.exec("all_reduce", bufs, [dtype, n, op, 0])
      const ref = Float64Array.from({ length: n }, (_, i) => fold(xs, op, i, dtype))
      for (const [r, id] of bufs.entries()) {
        const got = cpu.read(id, n + 3, dtype)
        expect(got.subarray(0, n)).toEqual(ref)
        expect(got.subarray(n)).toEqual(xs[r]!.subarray(n))
      }
    })

    it.each([
      [0, "sum"],
      [1, "max"],
    ])("reduce_scatter, op %i (%s)", (op) => {
      const per = 37
      const xs = inputs(k, per * k, dtype)
      const ins = xs.map((x, r) => cpu.float(x, dtype, r))
      const outs = xs.map((_, r) => cpu.filled(per, dtype, Number.NaN, r))
      cpu.exec("reduce_scatter", [...ins, ...outs], [dtype, k, per, op, 0])
      outs.forEach((id, r) => {
        const ref = Float64Array.from({ length: per }, (_, i) => fold(xs, op, r * per + i, dtype))
        expect(cpu.read(id, per, dtype)).toEqual(ref)
      })
    })
  })

  it("all_gather: out_r[j·n + i] = in_j[i], for any element size", () => {
    const per = 21
    const xs = Array.from({ length: k }, () => Int32Array.from({ length: per * 2 }, () => rng.int(-1e9, 1e9)))
    const ins = xs.map((x, r) => cpu.int32(x, r))
    const outs = xs.map((_, r) => cpu.bytes(per * 8 * k, r))
    cpu.exec("all_gather", [...ins, ...outs], [8, k, per, 0])
    const ref = Int32Array.from(xs.flatMap((x) => [...x]))
    for (const id of outs)
      expect(new Int32Array(cpu.backend.read(id, 0, per * 8 * k).slice().buffer)).toEqual(ref)
  })

  it("broadcast: every member gets the root's bytes", () => {
    const root = k - 1
    const xs = inputs(k, 50, F32)
    const bufs = xs.map((x, r) => cpu.float(x, F32, r))
    cpu.exec("broadcast", bufs, [4, 50, root, 0])
    for (const id of bufs) expect(cpu.read(id, 50, F32)).toEqual(xs[root])
  })
})

describe("collective argument checks", () => {
  it("rejects short buffers, wrong buffer counts, a bad op and a root outside the group", () => {
    const a = cpu.filled(10, F32, 1, 0)
    const b = cpu.filled(9, F32, 1, 1)
    expectInvalid(() => cpu.exec("all_reduce", [a, b], [F32, 10, 0, 0]), /buffer 1/)
    expectInvalid(() => cpu.exec("all_reduce", [a, b], [F32, 9, 2, 0]), /op/)
    expectInvalid(() => cpu.exec("all_reduce", [a, b], [F32, -9, 0, 0]), /non-negative/)
    expectInvalid(() => cpu.exec("all_gather", [a, b, a], [4, 2, 3, 0]), /k inputs and k outputs/)
    expectInvalid(() => cpu.exec("all_gather", [a, b, a, b], [4, 2, 5, 0]), /buffer 3/)
    expectInvalid(() => cpu.exec("reduce_scatter", [a, b, a, b], [F32, 2, 5, 0, 0]), /buffer 1/)
    expectInvalid(() => cpu.exec("reduce_scatter", [a, b], [F32, 0, 5, 0, 0]), /k inputs and k outputs/)
    expectInvalid(() => cpu.exec("broadcast", [a, b], [4, 9, 2, 0]), /root/)
    expectInvalid(() => cpu.exec("broadcast", [a, b], [4, 10, 0, 0]), /buffer 1/)
  })
})
