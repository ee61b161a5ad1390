/**
 * The GPU op harness shared by the GPU benchmarks: the CUDA backend on device 0, ops by name,
 * random device buffers, and device-side timing with CUDA events (median of many runs after
 * warm-up), plus the causal attention measurement that bench/ops-gpu.ts and bench/attention.ts
 * both report.
 */
import { loadNative, type NativeBackend } from "../src/native/index.ts"

export const BF16 = 2
export const F32 = 0

export interface Timing {
  readonly ms: number
  readonly spread: number
}

export const openGpu = () => {
  const addon = loadNative()
  const probe = addon.cudaProbe()
  if (probe.devices === 0) {
    console.error(`no GPU: ${probe.error}`)
    process.exit(1)
  }
  const gpu = probe.gpus[0]!
  const be: NativeBackend = addon.createCuda(1)
  const codes = new Map(be.opNames().map((n, i) => [n, i]))
  const exec = (op: string, bufs: ReadonlyArray<number>, args: ReadonlyArray<number>) => {
    const code = codes.get(op)
    if (code === undefined) throw new Error(`the CUDA backend has no op ${op}`)
    be.exec(code, bufs, args)
  }
  let key = 1
  /** A device buffer of n random normals (scaled by std) in bf16 or float32. */
  const randomBuffer = (n: number, dtype = BF16, std = 1) => {
    const id = be.alloc(0, n * (dtype === BF16 ? 2 : 4))
    exec("random_normal", [id], [dtype, key++, std, 1, n, 0, n])
    return id
  }
  const emptyBuffer = (n: number, bytes: number) => be.alloc(0, n * bytes)
  const reps = Number(process.env.MAGIX_BENCH_REPS ?? 20)
  const elapsed = be.alloc(0, 8)
  /** Median milliseconds of `run` on the device, after warm-up. */
  const time = (run: () => void, warmup = 3): Timing => {
    for (let i = 0; i < warmup; i++) run()
    const times: number[] = []
    for (let i = 0; i < reps; i++) {
      exec("event_record", [], [0, 0])
      run()
      exec("event_record", [], [0, 1])
      exec("event_elapsed", [elapsed], [0, 0, 1])
      times.push(new Float64Array(be.read(elapsed, 0, 8).buffer.slice(0))[0]!)
    }
    times.sort((a, b) => a - b)
    const median = times[Math.floor(times.length / 2)]!
    return { ms: median, spread: (times[times.length - 1]! - times[0]!) / median }
  }
  /**
   * Median milliseconds per call of `calls` runs queued back to back between two events: the
   * host's launch latency then overlaps the previous call instead of leaving the GPU idle before
   * each timed one (which `time`, one call per event pair with a read in between, includes).
   */
  const timeQueued = (run: () => void, calls = 10, warmup = 3): Timing => {
    for (let i = 0; i < warmup; i++) run()
    const times: number[] = []
    for (let i = 0; i < reps; i++) {
      exec("event_record", [], [0, 0])
      for (let c = 0; c < calls; c++) run()
      exec("event_record", [], [0, 1])
      exec("event_elapsed", [elapsed], [0, 0, 1])
      times.push(new Float64Array(be.read(elapsed, 0, 8).buffer.slice(0))[0]! / calls)
    }
    times.sort((a, b) => a - b)
    const median = times[Math.floor(times.length / 2)]!
    return { ms: median, spread: (times[times.length - 1]! - times[0]!) / median }
  }
  const close = () => {
    be.free(elapsed)
    be.dispose()
  }
  return { probe, gpu, be, exec, randomBuffer, emptyBuffer, reps, time, timeQueued, close }
}

export type Gpu = ReturnType<typeof openGpu>

/** Useful FLOPs of causal attention's forward pass; backward counts 2.5 times that. */
export const causalForwardFlops = (B: number, T: number, Hq: number, hd: number) =>
  (4 * B * Hq * T * T * hd) / 2

/** Times forward, backward and both of causal bf16 attention at one shape. */
export const timeAttention = (
  g: Gpu,
  [B, T, Hq, Hkv, hd]: readonly [number, number, number, number, number],
) => {
  const qn = B * T * Hq * hd
  const kn = B * T * Hkv * hd
  const q = g.randomBuffer(qn)
  const k = g.randomBuffer(kn)
  const v = g.randomBuffer(kn)
  const dO = g.randomBuffer(qn)
  const o = g.emptyBuffer(qn, 2)
  const lse = g.emptyBuffer(B * Hq * T, 4)
  const [dq, dk, dv] = [g.emptyBuffer(qn, 2), g.emptyBuffer(kn, 2), g.emptyBuffer(kn, 2)]
  const args = [BF16, B, T, T, Hq, Hkv, hd, 1 / Math.sqrt(hd), 1, 0, 0, 0, T]
  const fwd = () => g.exec("attention_fwd", [q, k, v, o, lse], args)
  const bwd = () => g.exec("attention_bwd", [q, k, v, o, lse, dO, dq, dk, dv], args)
  const forward = g.time(fwd)
  fwd()
  const backward = g.time(bwd)
  const both = g.time(() => {
    fwd()
    bwd()
  })
  for (const id of [q, k, v, dO, o, lse, dq, dk, dv]) g.be.free(id)
  return { forward, backward, both, flops: causalForwardFlops(B, T, Hq, hd) }
}
