/**
 * Vocabulary-parallel embedding: lookups of held and foreign ids, the backward scatter with
 * repeated ids (overwrite and accumulate) against finite differences, and argument checks.
 */
import { afterAll, describe, expect, it } from "vitest"
import { Cpu, dot, expectGradients, expectInvalid, F32, F64, f32, Rng, relErr } from "./helpers.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())

// This device holds rows [start, start + V) of a 40-row vocabulary; ids cover the whole of it.
const [N, V, D, start] = [50, 12, 37, 10]
const rng = new Rng(5)
const ids = Array.from({ length: N }, (_, n) => (n < 3 ? start + 4 : rng.int(0, 40)))

const refForward = (table: ArrayLike<number>) => {
  const out = new Float64Array(N * D)
  ids.forEach((id, n) => {
    const r = id - start
    if (r >= 0 && r < V) for (let d = 0; d < D; d++) out[n * D + d] = table[r * D + d]!
  })
  return out
}

const refBackward = (dout: ArrayLike<number>) => {
  const dt = new Float64Array(V * D)
  ids.forEach((id, n) => {
    const r = id - start
    if (r >= 0 && r < V) for (let d = 0; d < D; d++) dt[r * D + d]! += dout[n * D + d]!
  })
  return dt
}

describe("embedding", () => {
  it("forward gathers held rows and zeroes the others (float32)", () => {
    const table = f32(rng.uniform(V * D))
    const out = cpu.filled(N * D, F32, Number.NaN)
    cpu.exec("embedding_fwd", [cpu.float(table, F32), cpu.int32(ids), out], [F32, N, V, D, start])
    expect(relErr(cpu.read(out, N * D, F32), refForward(table))).toBeLessThan(1e-5)
  })

  it("backward sums repeated ids, overwriting or accumulating (float32)", () => {
    const dout = f32(rng.uniform(N * D))
    const prior = f32(rng.uniform(V * D))
    const ref = refBackward(dout)
    const dt = cpu.filled(V * D, F32, Number.NaN)
    cpu.exec("embedding_bwd", [cpu.int32(ids), cpu.float(dout, F32), dt], [F32, N, V, D, start, 0])
    expect(relErr(cpu.read(dt, V * D, F32), ref)).toBeLessThan(1e-5)
    cpu.write(dt, prior, F32)
    cpu.exec("embedding_bwd", [cpu.int32(ids), cpu.float(dout, F32), dt], [F32, N, V, D, start, 1])
    expect(
      relErr(
        cpu.read(dt, V * D, F32),
        ref.map((v, i) => v + prior[i]!),
      ),
    ).toBeLessThan(1e-5)
  })

  it("backward is the gradient of Σ out·G (float64, finite differences)", () => {
    const table = rng.uniform(V * D)
    const G = rng.uniform(N * D)
    const [tb, idb, out] = [cpu.float(table, F64), cpu.int32(ids), cpu.filled(N * D, F64, 0)]
    const loss = ([t]: ReadonlyArray<Float64Array>) => {
      cpu.write(tb, t!, F64)
      cpu.exec("embedding_fwd", [tb, idb, out], [F64, N, V, D, start])
      return dot(cpu.read(out, N * D, F64), G)
    }
    const dt = cpu.filled(V * D, F64, 0)
    cpu.exec("embedding_bwd", [idb, cpu.float(G, F64), dt], [F64, N, V, D, start, 0])
    expectGradients(loss, [table], [cpu.read(dt, V * D, F64)], rng)
  })

  it("rejects short buffers and negative sizes", () => {
    const table = cpu.filled(V * D, F32, 1)
    const idb = cpu.int32(ids)
    const out = cpu.filled(N * D, F32, 0)
    expectInvalid(() => cpu.exec("embedding_fwd", [table, idb, out], [F32, N, V + 1, D, start]), /buffer 0/)
    expectInvalid(() => cpu.exec("embedding_fwd", [table, idb, out], [F32, N + 1, V, D, start]), /buffer 1/)
    expectInvalid(() => cpu.exec("embedding_fwd", [table, idb, out], [F32, -1, V, D, start]), /non-negative/)
    expectInvalid(() => cpu.exec("embedding_bwd", [idb, out, table], [F32, N, V, D + 1, start, 0]), /buffer/)
    expectInvalid(
      () => cpu.exec("embedding_bwd", [idb, out, table], [F32, N, V, -D, start, 0]),
      /non-negative/,
    )
    expectInvalid(() => cpu.exec("embedding_bwd", [idb, out, table], [F64, N, V, D, start, 0]), /buffer/)
  })
})
