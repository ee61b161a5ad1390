/** Gated activations (SiLU and tanh-GELU) against TypeScript and their exact derivatives. */
import { afterAll, describe, expect, it } from "vitest"
import { Cpu, dot, expectGradients, expectInvalid, F32, F64, f32, Rng, relErr } from "./helpers.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())
const rng = new Rng(4)

const act = [
  (x: number) => x / (1 + Math.exp(-x)),
  (x: number) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3))),
]

describe.each([
  [0, "SiLU"],
  [1, "tanh-GELU"],
])("glu, activation %i (%s)", (a) => {
  it("forward matches the reference (float32)", () => {
    const n = 5000
    const g = f32(rng.uniform(n, -6, 6))
    const u = f32(rng.uniform(n))
    const h = cpu.filled(n, F32, Number.NaN)
    cpu.exec("glu_fwd", [cpu.float(g, F32), cpu.float(u, F32), h], [F32, n, a])
    expect(
      relErr(
        cpu.read(h, n, F32),
        g.map((x, i) => act[a]!(x) * u[i]!),
      ),
    ).toBeLessThan(1e-5)
  })

  it("backward is the gradient of Σ h·G (float64, finite differences)", () => {
    const n = 300
    const g = rng.uniform(n, -5, 5)
    const u = rng.uniform(n)
    const G = rng.uniform(n)
    const [gb, ub, h] = [cpu.float(g, F64), cpu.float(u, F64), cpu.filled(n, F64, 0)]
    const loss = ([gs, us]: ReadonlyArray<Float64Array>) => {
      cpu.write(gb, gs!, F64)
      cpu.write(ub, us!, F64)
      cpu.exec("glu_fwd", [gb, ub, h], [F64, n, a])
      return dot(cpu.read(h, n, F64), G)
    }
    const [dg, du] = [cpu.filled(n, F64, Number.NaN), cpu.filled(n, F64, Number.NaN)]
    cpu.exec("glu_bwd", [gb, ub, cpu.float(G, F64), dg, du], [F64, n, a])
    expectGradients(loss, [g, u], [cpu.read(dg, n, F64), cpu.read(du, n, F64)], rng)
  })
})

describe("glu argument checks", () => {
  it("rejects an unknown activation, short buffers and negative sizes", () => {
    const [g, u, h] = [cpu.filled(8, F32, 1), cpu.filled(8, F32, 1), cpu.filled(4, F32, 0)]
    expectInvalid(() => cpu.exec("glu_fwd", [g, u, h], [F32, 4, 2]), /activation/)
    expectInvalid(() => cpu.exec("glu_fwd", [g, u, h], [F32, 8, 0]), /buffer 2/)
    expectInvalid(() => cpu.exec("glu_fwd", [g, u, h], [F32, -1, 0]), /non-negative/)
    expectInvalid(() => cpu.exec("glu_bwd", [g, u, g, u, h], [F32, 8, 1]), /buffer 4/)
    expectInvalid(() => cpu.exec("glu_bwd", [g, u, g, u], [F32, 4, 1]), /missing buffer 4/)
  })
})
