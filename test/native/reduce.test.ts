/** sum and sumsq (float64 accumulation, weight, accumulate) against TypeScript. */
import { afterAll, describe, expect, it } from "vitest"
import { Cpu, expectInvalid, F32, F64, type FloatDtype, f32, Rng, relErr } from "./helpers.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())
const rng = new Rng(6)

describe.each([F32, F64])("reductions, dtype %i", (dtype: FloatDtype) => {
  const n = 50_001
  const x = f32(rng.uniform(n, -1, 3))
  const xb = cpu.float(x, dtype)
  const sum = x.reduce((a, b) => a + b, 0)
  const sumsq = x.reduce((a, b) => a + b * b, 0)

  it("sum: out (+)= weight·Σ x, out in the dtype", () => {
    const out = cpu.filled(1, dtype, Number.NaN)
    cpu.exec("sum", [xb, out], [dtype, n, 0.25, 0])
    expect(relErr(cpu.read(out, 1, dtype), [0.25 * sum])).toBeLessThan(1e-7)
    cpu.exec("sum", [xb, out], [dtype, n, -2, 1])
    expect(relErr(cpu.read(out, 1, dtype), [0.25 * sum - 2 * sum])).toBeLessThan(1e-7)
  })

  it("sumsq: out (+)= weight·Σ x², out float64", () => {
    const out = cpu.filled(1, F64, Number.NaN)
    cpu.exec("sumsq", [xb, out], [dtype, n, 3, 0])
    expect(relErr(cpu.read(out, 1, F64), [3 * sumsq])).toBeLessThan(1e-12)
    cpu.exec("sumsq", [xb, out], [dtype, n, 1, 1])
    expect(relErr(cpu.read(out, 1, F64), [4 * sumsq])).toBeLessThan(1e-12)
  })
})

describe("reduction argument checks", () => {
  it("rejects short buffers and negative sizes", () => {
    const x = cpu.filled(10, F32, 1)
    const out32 = cpu.filled(1, F32, 0)
    expectInvalid(() => cpu.exec("sum", [x, out32], [F32, 11, 1, 0]), /buffer 0/)
    expectInvalid(() => cpu.exec("sum", [x, out32], [F32, -1, 1, 0]), /non-negative/)
    expectInvalid(() => cpu.exec("sumsq", [x, out32], [F32, 10, 1, 0]), /buffer 1/)
    expectInvalid(() => cpu.exec("sum", [x, cpu.bytes(0)], [F32, 10, 1, 0]), /buffer 1/)
  })
})
