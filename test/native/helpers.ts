/**
 * Helpers for the native op tests: a CPU backend with typed buffer upload and read-back,
 * seeded random arrays, relative error, central finite differences, and the expectation that a
 * call is rejected as an invalid argument.
 */
import { expect } from "vitest"
import type { Backend, BufferId } from "../../src/core/backend.ts"
import { NativeInvariantViolation } from "../../src/core/errors.ts"
import { adaptNativeBackend } from "../../src/layers/nativeBackend.ts"
import { loadNative, type NativeBackend } from "../../src/native/index.ts"

/** The float dtype codes the CPU backend computes in. */
export type FloatDtype = 0 | 1
export const F32: FloatDtype = 0
export const F64: FloatDtype = 1

/**
 * A CPU backend of `devices` virtual devices and the buffers made through it; `dispose` frees
 * them all and releases the backend.
 */
export class Cpu {
  readonly backend: Backend
  private readonly native: NativeBackend
  private readonly live = new Set<BufferId>()

  constructor(devices = 1) {
    const addon = loadNative()
    this.native = addon.createCpu(devices)
    this.backend = adaptNativeBackend(addon, this.native)
  }

  /** A buffer holding `data` as float32 (dtype 0) or float64 (dtype 1). */
  float(data: ArrayLike<number>, dtype: FloatDtype, device = 0): BufferId {
    return this.upload(dtype === F32 ? Float32Array.from(data) : Float64Array.from(data), device)
  }
  int32(data: ArrayLike<number>, device = 0): BufferId {
    return this.upload(Int32Array.from(data), device)
  }
  uint8(data: ArrayLike<number>, device = 0): BufferId {
    return this.upload(Uint8Array.from(data), device)
  }
  /** A float buffer of n elements filled with `value` (NaN shows that an op never reads it). */
  filled(n: number, dtype: FloatDtype, value: number, device = 0): BufferId {
    return this.float(new Array<number>(n).fill(value), dtype, device)
  }
  /** A buffer of exactly `bytes` bytes, uninitialised. */
  bytes(bytes: number, device = 0): BufferId {
    const id = this.backend.alloc(device, bytes)
    this.live.add(id)
    return id
  }

  private upload(view: ArrayBufferView, device: number): BufferId {
    const id = this.bytes(view.byteLength, device)
    if (view.byteLength > 0) this.backend.write(id, 0, view)
    return id
  }

  /** The first n float elements of a buffer, as numbers. */
  read(id: BufferId, n: number, dtype: FloatDtype): Float64Array {
    const size = dtype === F32 ? 4 : 8
    const raw = this.backend.read(id, 0, n * size)
    const view =
      dtype === F32
        ? new Float32Array(raw.buffer, raw.byteOffset, n)
        : new Float64Array(raw.buffer, raw.byteOffset, n)
    return Float64Array.from(view)
  }

  /** Overwrites a float buffer from the start. */
  write(id: BufferId, data: ArrayLike<number>, dtype: FloatDtype): void {
    this.backend.write(id, 0, dtype === F32 ? Float32Array.from(data) : Float64Array.from(data))
  }

  opNames(): string[] {
    return this.native.opNames()
  }

  exec(op: string, buffers: ReadonlyArray<BufferId>, args: ReadonlyArray<number>): void {
    this.backend.exec(op, buffers, args)
  }

  free(id: BufferId): void {
    this.backend.free(id)
    this.live.delete(id)
  }

  dispose(): void {
    for (const id of this.live) this.backend.free(id)
    this.live.clear()
    this.native.dispose()
  }
}

/** A seeded generator (mulberry32), so every run sees the same inputs. */
export class Rng {
  private state: number
  constructor(seed: number) {
    this.state = seed >>> 0
  }
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0
    let t = this.state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32
  }
  /** n values uniform in [lo, hi). */
  uniform(n: number, lo = -1, hi = 1): Float64Array {
    return Float64Array.from({ length: n }, () => lo + (hi - lo) * this.next())
  }
  /** An integer uniform in [lo, hi). */
  int(lo: number, hi: number): number {
    return lo + Math.floor((hi - lo) * this.next())
  }
  /** k distinct indices of [0, n), sorted (all of them when k ≥ n). */
  sample(n: number, k: number): number[] {
    if (k >= n) return Array.from({ length: n }, (_, i) => i)
    const picked = new Set<number>()
    while (picked.size < k) picked.add(this.int(0, n))
    return [...picked].sort((a, b) => a - b)
  }
}

/** Rounds every element to float32, so a reference sees exactly what a float32 kernel sees. */
export const f32 = (x: ArrayLike<number>): Float64Array => Float64Array.from(Float32Array.from(x))

/** ‖a − b‖ / ‖b‖; NaN, a length mismatch or a zero reference never pass. */
export const relErr = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  if (a.length !== b.length) return Number.POSITIVE_INFINITY
  let num = 0
  let den = 0
  for (let i = 0; i < a.length; i++) {
    num += (a[i]! - b[i]!) ** 2
    den += b[i]! ** 2
  }
  const r = Math.sqrt(num / den)
  return Number.isNaN(r) || den === 0 ? Number.POSITIVE_INFINITY : r
}

/** Σ a·b */
export const dot = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let s = 0
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!
  return s
}

/** The elements of x at `indices`. */
export const pick = (x: ArrayLike<number>, indices: ReadonlyArray<number>): number[] =>
  indices.map((i) => x[i]!)

/**
 * Central differences (f(x + h·e_j) − f(x − h·e_j)) / 2h of a scalar function of several host
 * arrays, at the given indices of input `which` (the array is perturbed in place and restored).
 */
export const finiteDiff = (
  f: (inputs: ReadonlyArray<Float64Array>) => number,
  inputs: ReadonlyArray<Float64Array>,
  which: number,
  indices: ReadonlyArray<number>,
  h = 1e-6,
): number[] => {
  const x = inputs[which]!
  return indices.map((j) => {
    const x0 = x[j]!
    x[j] = x0 + h
    const up = f(inputs)
    x[j] = x0 - h
    const down = f(inputs)
    x[j] = x0
    return (up - down) / (2 * h)
  })
}

/**
 * Checks the analytic gradients of a float64 loss against central differences, input by input,
 * at up to `samples` indices of each: the relative error of each must be under `tol`.
 */
export const expectGradients = (
  f: (inputs: ReadonlyArray<Float64Array>) => number,
  inputs: ReadonlyArray<Float64Array>,
  analytic: ReadonlyArray<ArrayLike<number> | undefined>,
  rng: Rng,
  { samples = 400, tol = 1e-6 }: { samples?: number; tol?: number } = {},
): void => {
  analytic.forEach((grad, which) => {
    if (!grad) return
    const indices = rng.sample(inputs[which]!.length, samples)
    const numeric = finiteDiff(f, inputs, which, indices)
    const err = relErr(pick(grad, indices), numeric)
    expect(err, `input ${which}: relative error ${err}`).toBeLessThan(tol)
  })
}

/** Expects the call to be rejected as an invalid argument (the process carries on). */
export const expectInvalid = (f: () => void, message?: RegExp): void => {
  let error: unknown
  try {
    f()
  } catch (e) {
    error = e
  }
  expect(error).toBeInstanceOf(NativeInvariantViolation)
  if (message) expect((error as NativeInvariantViolation).detail).toMatch(message)
}
