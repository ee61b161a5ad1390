/**
 * sumsq_multi (the global gradient norm's square over a list of tensors in one op) against a
 * TypeScript float64 reference and against one sumsq call per tensor: odd sizes, an empty tensor,
 * per-tensor weights, accumulate on and off, argument checks. Where a GPU is present, the CUDA
 * kernel (two launches, fixed-order float64 partials) against the CPU's, in float32 and bfloat16,
 * over more tensors than one launch's parameter struct holds and a tensor of more tiles than blocks.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import type { BufferId } from "../../src/core/backend.ts"
import { loadNative, type NativeBackend } from "../../src/native/index.ts"
import { Cpu, expectInvalid, F32, F64, type FloatDtype, f32, Rng } from "./helpers.ts"

const cpu = new Cpu()
afterAll(() => cpu.dispose())
const rng = new Rng(17)

// Odd sizes across a chunk boundary of the CPU reduction (2^14), one empty tensor, one scalar.
const sizes = [1, 0, 3, 16_385, 777, 50_001, 2]
const weights = [1, 0.5, 0.25, 1, 1 / 3, 2, 0.125]

const rel = (a: number, b: number) => Math.abs(a - b) / Math.abs(b)

describe.each([F32, F64])("sumsq_multi, dtype %i", (dtype: FloatDtype) => {
  const xs = sizes.map((n) => {
    const x = rng.uniform(n, -2, 3)
    return dtype === F32 ? f32(x) : x
  })
  const ids = xs.map((x) => (x.length > 0 ? cpu.float(x, dtype) : cpu.bytes(0)))
  const sq = (x: Float64Array) => x.reduce((a, b) => a + b * b, 0)
  const ref = xs.reduce((a, x, i) => a + weights[i]! * sq(x), 0)
  const args = (accumulate: number, count = sizes.length) => {
    const a = [dtype, count, accumulate]
    for (let i = 0; i < count; i++) a.push(sizes[i]!, weights[i]!)
    return a
  }
  const read = (out: BufferId) => cpu.read(out, 1, F64)[0]!

  it("out = Σ weight_i·Σ x_i² without accumulate (out is never read)", () => {
    const out = cpu.filled(1, F64, Number.NaN)
    cpu.exec("sumsq_multi", [...ids, out], args(0))
    expect(rel(read(out), ref)).toBeLessThan(1e-12)
  })

  it("out += Σ weight_i·Σ x_i² with accumulate", () => {
    const out = cpu.filled(1, F64, 0.75)
    cpu.exec("sumsq_multi", [...ids, out], args(1))
    expect(rel(read(out), 0.75 + ref)).toBeLessThan(1e-12)
  })

  it("has the bits of one sumsq per tensor, accumulating after the first", () => {
    for (const accumulate of [0, 1]) {
      const multi = cpu.filled(1, F64, 1.5)
      const single = cpu.filled(1, F64, 1.5)
      cpu.exec("sumsq_multi", [...ids, multi], args(accumulate))
      ids.forEach((id, i) =>
        cpu.exec("sumsq", [id, single], [dtype, sizes[i]!, weights[i]!, i === 0 ? accumulate : 1]),
      )
      expect(read(multi)).toBe(read(single))
    }
  })

  it("a prefix of the list, one tensor, and an empty list", () => {
    const out = cpu.filled(1, F64, Number.NaN)
    cpu.exec("sumsq_multi", [...ids.slice(0, 4), out], args(0, 4))
    const ref4 = xs.slice(0, 4).reduce((a, x, i) => a + weights[i]! * sq(x), 0)
    expect(rel(read(out), ref4)).toBeLessThan(1e-12)
    cpu.exec("sumsq_multi", [ids[5]!, out], [dtype, 1, 0, sizes[5]!, 3])
    expect(rel(read(out), 3 * sq(xs[5]!))).toBeLessThan(1e-12)
    cpu.exec("sumsq_multi", [out], [dtype, 0, 0])
    expect(read(out)).toBe(0)
    cpu.write(out, [2.5], F64)
    cpu.exec("sumsq_multi", [out], [dtype, 0, 1])
    expect(read(out)).toBe(2.5)
  })

  it("the same bits on every call", () => {
    const a = cpu.filled(1, F64, 0)
    const b = cpu.filled(1, F64, 0)
    cpu.exec("sumsq_multi", [...ids, a], args(0))
    cpu.exec("sumsq_multi", [...ids, b], args(0))
    expect(read(a)).toBe(read(b))
  })

  it("a non-finite element gives a non-finite sum", () => {
    const x = cpu.float([1, Number.POSITIVE_INFINITY, 2], dtype)
    const out = cpu.filled(1, F64, 0)
    cpu.exec("sumsq_multi", [ids[2]!, x, out], [dtype, 2, 0, 3, 1, 3, 1])
    expect(read(out)).toBe(Number.POSITIVE_INFINITY)
    const y = cpu.float([1, Number.NaN, 2], dtype)
    cpu.exec("sumsq_multi", [ids[2]!, y, out], [dtype, 2, 0, 3, 1, 3, 1])
    expect(Number.isNaN(read(out))).toBe(true)
  })
})

describe("sumsq_multi argument checks", () => {
  it("rejects a wrong buffer count, short buffers, bad sizes and missing arguments", () => {
    const a = cpu.filled(10, F32, 1)
    const b = cpu.filled(4, F32, 1)
    const out = cpu.filled(1, F64, 0)
    const out32 = cpu.filled(1, F32, 0)
    expectInvalid(() => cpu.exec("sumsq_multi", [a, b, out], [F32, 1, 0, 10, 1]), /buffers must be/)
    expectInvalid(() => cpu.exec("sumsq_multi", [a, out], [F32, 2, 0, 10, 1, 4, 1]), /buffers must be/)
    expectInvalid(() => cpu.exec("sumsq_multi", [a, b, out], [F32, 2, 0, 10, 1, 5, 1]), /buffer 1/)
    expectInvalid(() => cpu.exec("sumsq_multi", [a, b, out], [F32, 2, 0, 11, 1, 4, 1]), /buffer 0/)
    expectInvalid(() => cpu.exec("sumsq_multi", [a, b, out32], [F32, 2, 0, 10, 1, 4, 1]), /buffer 2/)
    expectInvalid(() => cpu.exec("sumsq_multi", [a, b, out], [F32, 2, 0, -1, 1, 4, 1]), /non-negative/)
    expectInvalid(() => cpu.exec("sumsq_multi", [a, b, out], [F32, 2, 0, 10, 1, 4]), /missing argument/)
    expectInvalid(() => cpu.exec("sumsq_multi", [a, b, out], [4, 2, 0, 10, 1, 4, 1]))
    // Nothing was written by a rejected call.
    expect(cpu.read(out, 1, F64)[0]).toBe(0)
  })
})

const gpus = (() => {
  try {
    return loadNative().cudaProbe().devices
  } catch {
    return 0
  }
})()

describe.skipIf(gpus === 0)("sumsq_multi on CUDA", () => {
  let cuda: NativeBackend
  let host: NativeBackend
  beforeAll(() => {
    cuda = loadNative().createCuda(1)
    host = loadNative().createCpu(1)
  })
  afterAll(() => {
    cuda?.dispose()
    host?.dispose()
  })

  /** bfloat16 bits of float32 values (round to nearest even), and back. */
  const bf16 = (x: Float32Array) => {
    const u = new Uint32Array(x.buffer, x.byteOffset, x.length)
    return Uint16Array.from(u, (v) => ((v + 0x7fff + ((v >>> 16) & 1)) >>> 16) & 0xffff)
  }
  const unbf16 = (h: Uint16Array) => new Float32Array(Uint32Array.from(h, (v) => v << 16).buffer)

  /** Runs sumsq_multi on `be` over the tensors (float32, or their bfloat16 bits), out starting at `init`. */
  const runOn = (
    be: NativeBackend,
    dtype: 0 | 2,
    xs: ReadonlyArray<Float32Array | Uint16Array>,
    weights: ReadonlyArray<number>,
    accumulate: number,
    init: number,
  ): number => {
    const ids: number[] = []
    try {
      for (const x of xs) {
        const id = be.alloc(0, Math.max(4, x.byteLength))
        ids.push(id)
        if (x.length > 0) be.write(id, 0, x)
      }
      const out = be.alloc(0, 8)
      ids.push(out)
      be.write(out, 0, Float64Array.of(init))
      const args = [dtype, xs.length, accumulate]
      xs.forEach((x, i) => args.push(x.length, weights[i]!))
      be.exec(be.opNames().indexOf("sumsq_multi"), ids, args)
      const raw = be.read(out, 0, 8)
      return new Float64Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + 8))[0]!
    } finally {
      for (const id of ids) be.free(id)
    }
  }

  const g = new Rng(23)
  // 600 tensors (two parameter groups of 512): odd sizes, some empty, one over 1024 tiles.
  const xs = Array.from({ length: 600 }, (_, i) => {
    const n = i === 7 ? 20_000_003 : i % 50 === 3 ? 0 : g.int(1, 5000)
    return Float32Array.from(g.uniform(n, -1, 1))
  })
  const weights = xs.map((_, i) => (i % 3 === 0 ? 0.5 : 1))

  it("float32: equals the CPU within float64 rounding, accumulate off and on, the same bits twice", () => {
    for (const [accumulate, init] of [
      [0, Number.NaN],
      [1, 0.75],
    ] as const) {
      const ref = runOn(host, 0, xs, weights, accumulate, init)
      const got = runOn(cuda, 0, xs, weights, accumulate, init)
      expect(Math.abs(got - ref) / ref).toBeLessThan(1e-12)
      expect(runOn(cuda, 0, xs, weights, accumulate, init)).toBe(got)
    }
    // One small group, a single tensor, and an empty list.
    const few = xs.slice(0, 5)
    const ref = runOn(host, 0, few, weights, 0, 0)
    expect(Math.abs(runOn(cuda, 0, few, weights, 0, 0) - ref) / ref).toBeLessThan(1e-12)
    expect(runOn(cuda, 0, [], [], 0, Number.NaN)).toBe(0)
    expect(runOn(cuda, 0, [], [], 1, 2.5)).toBe(2.5)
  })

  it("bfloat16: equals the CPU over the same rounded values", () => {
    const bits = xs.map(bf16)
    const ref = runOn(host, 0, bits.map(unbf16), weights, 0, 0)
    const got = runOn(cuda, 2, bits, weights, 0, 0)
    expect(Math.abs(got - ref) / ref).toBeLessThan(1e-12)
  })

  it("rejects short buffers before enqueuing anything", () => {
    const a = cuda.alloc(0, 40)
    const out = cuda.alloc(0, 8)
    try {
      expect(() => cuda.exec(cuda.opNames().indexOf("sumsq_multi"), [a, out], [0, 1, 0, 11, 1])).toThrow(
        /buffer 0/,
      )
      expect(() => cuda.exec(cuda.opNames().indexOf("sumsq_multi"), [a, out], [0, 2, 0, 10, 1])).toThrow(
        /buffers must be/,
      )
    } finally {
      cuda.free(a)
      cuda.free(out)
    }
  })
})
