/** axpby, add and mul against TypeScript, aliasing as OPS.md allows, and their argument checks. */
import { afterAll, describe, expect, it } from "vitest"
import { Cpu, expectInvalid, F32, F64, type FloatDtype, f32, Rng, relErr } from "./helpers.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())
const rng = new Rng(1)
const n = 1000

describe.each([F32, F64])("elementwise, dtype %i", (dtype: FloatDtype) => {
  const round = dtype === F32 ? f32 : (x: Float64Array) => x
  const x = round(rng.uniform(n))
  const y = round(rng.uniform(n))

  it("axpby: y = a·x + b·y", () => {
    const yb = cpu.float(y, dtype)
    cpu.exec("axpby", [cpu.float(x, dtype), yb], [dtype, n, 0.7, -1.3])
    expect(
      relErr(
        cpu.read(yb, n, dtype),
        x.map((v, i) => 0.7 * v - 1.3 * y[i]!),
      ),
    ).toBeLessThan(1e-6)
  })

  it("axpby with b = 0 never reads y", () => {
    const yb = cpu.filled(n, dtype, Number.NaN)
    cpu.exec("axpby", [cpu.float(x, dtype), yb], [dtype, n, 2.5, 0])
    expect(
      relErr(
        cpu.read(yb, n, dtype),
        x.map((v) => 2.5 * v),
      ),
    ).toBeLessThan(1e-6)
  })

  it("axpby with x aliasing y", () => {
    const yb = cpu.float(y, dtype)
    cpu.exec("axpby", [yb, yb], [dtype, n, 2, 3])
    expect(
      relErr(
        cpu.read(yb, n, dtype),
        y.map((v) => 5 * v),
      ),
    ).toBeLessThan(1e-6)
  })

  it.each([
    ["add", (a: number, b: number) => a + b],
    ["mul", (a: number, b: number) => a * b],
  ] as const)("%s, into a fresh buffer and in place", (op, f) => {
    const ref = x.map((v, i) => f(v, y[i]!))
    const a = cpu.float(x, dtype)
    const b = cpu.float(y, dtype)
    const c = cpu.filled(n, dtype, Number.NaN)
    cpu.exec(op, [a, b, c], [dtype, n])
    expect(relErr(cpu.read(c, n, dtype), ref)).toBeLessThan(1e-6)
    cpu.exec(op, [a, b, a], [dtype, n])
    expect(relErr(cpu.read(a, n, dtype), ref)).toBeLessThan(1e-6)
  })
})

describe("elementwise argument checks", () => {
  it("rejects a short buffer, a negative size and an integer dtype", () => {
    const a = cpu.float(rng.uniform(8), F32)
    const b = cpu.float(rng.uniform(7), F32)
    expectInvalid(() => cpu.exec("add", [a, b, a], [F32, 8]), /buffer 1/)
    expectInvalid(() => cpu.exec("axpby", [a, a], [F32, -1, 1, 1]), /non-negative/)
    expectInvalid(() => cpu.exec("mul", [a, a, a], [4, 8]))
    expectInvalid(() => cpu.exec("axpby", [a, a], [F64, 8, 1, 1]), /buffer/)
  })
})
