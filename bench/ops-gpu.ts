/**
 * Throughput of the CUDA backend's heaviest ops on one GPU, timed on the device with CUDA events
 * (the event_record / event_elapsed ops): the median of many runs after warm-up.
 *   - matmul in bf16 (float32 accumulation): 8192³, and the Llama-3.2-1B step's linear layers
 *     over 16384 tokens (2048→2048, 2048→512, 2048→8192, 8192→2048, 2048→128256), each as the
 *     forward product (y = x·Wᵀ, bf16 out), the input gradient (dx = dy·W, bf16 out) and the
 *     weight gradient (dW = dyᵀ·x, float32 out);
 *   - attention forward and backward, causal, bf16: B=8, T=2048 with 32 query / 8 KV heads of 64,
 *     and 16 / 8 heads of 128.
 * FLOPs are the useful work: 2·M·N·K for a matmul; 4·B·Hq·T²·hd/2 for causal attention's forward
 * pass and 2.5 times that for its backward pass (five products of which one recomputes q·kᵀ).
 * Inputs are random normals made on the device (random_normal), never zeros.
 *   npx tsx bench/ops-gpu.ts          (MAGIX_BENCH_REPS sets the timed runs, default 20)
 * Prints a table and writes bench/results/ops-gpu-<date>.json (device, date, commit, numbers).
 */
import { loadNative, type NativeBackend } from "../src/native/index.ts"
import { printTable, writeResult } from "./report.ts"

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

const BF16 = 2
const F32 = 0
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
const time = (run: () => void, warmup = 3): { ms: number; spread: number } => {
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

interface Row {
  op: string
  shape: string
  ms: number
  "TFLOP/s": number
  spread: number
}
const rows: Row[] = []
const report = (op: string, shape: string, flops: number, t: { ms: number; spread: number }) => {
  rows.push({ op, shape, ms: t.ms, "TFLOP/s": flops / (t.ms / 1000) / 1e12, spread: t.spread })
  console.error(`${op} ${shape}: ${t.ms.toFixed(3)} ms, ${(flops / (t.ms / 1000) / 1e12).toFixed(1)} TFLOP/s`)
}

/** matmul args for row-major C [M, N] = op(A)·op(B), packed. */
const mm = (M: number, N: number, K: number, ta: number, tb: number, cdtype = BF16) => [
  BF16,
  1,
  M,
  N,
  K,
  ta,
  tb,
  1,
  0,
  ta ? M : K,
  tb ? K : N,
  N,
  0,
  0,
  0,
  0,
  0,
  0,
  cdtype,
]

// ---- matmul ----
{
  const n = 8192
  const [a, b] = [randomBuffer(n * n), randomBuffer(n * n)]
  const cbuf = emptyBuffer(n * n, 2)
  report(
    "matmul bf16",
    `${n}³`,
    2 * n ** 3,
    time(() => exec("matmul", [a, b, cbuf], mm(n, n, n, 0, 0))),
  )
  for (const id of [a, b, cbuf]) be.free(id)
}
const tokens = 16384
for (const [din, dout] of [
  [2048, 2048],
  [2048, 512],
  [2048, 8192],
  [8192, 2048],
  [2048, 128256],
] as const) {
  const x = randomBuffer(tokens * din)
  const w = randomBuffer(dout * din, BF16, 0.02)
  const y = randomBuffer(tokens * dout) // doubles as dy
  const dx = emptyBuffer(tokens * din, 2)
  const dw = emptyBuffer(dout * din, 4)
  const flops = 2 * tokens * din * dout
  const shape = `${tokens}×(${din}→${dout})`
  // y = x·Wᵀ: M tokens, N out, K in
  report(
    "linear fwd",
    shape,
    flops,
    time(() => exec("matmul", [x, w, y], mm(tokens, dout, din, 0, 1))),
  )
  // dx = dy·W: M tokens, N in, K out
  report(
    "linear dgrad",
    shape,
    flops,
    time(() => exec("matmul", [y, w, dx], mm(tokens, din, dout, 0, 0))),
  )
  // dW = dyᵀ·x: M out, N in, K tokens, float32 out
  report(
    "linear wgrad",
    shape,
    flops,
    time(() => exec("matmul", [y, x, dw], mm(dout, din, tokens, 1, 0, F32))),
  )
  for (const id of [x, w, y, dx, dw]) be.free(id)
}

// ---- attention ----
for (const [B, T, Hq, Hkv, hd] of [
  [8, 2048, 32, 8, 64],
  [8, 2048, 16, 8, 128],
] as const) {
  const qn = B * T * Hq * hd
  const kn = B * T * Hkv * hd
  const q = randomBuffer(qn)
  const k = randomBuffer(kn)
  const v = randomBuffer(kn)
  const dO = randomBuffer(qn)
  const o = emptyBuffer(qn, 2)
  const lse = emptyBuffer(B * Hq * T, 4)
  const [dq, dk, dv] = [emptyBuffer(qn, 2), emptyBuffer(kn, 2), emptyBuffer(kn, 2)]
  const args = [BF16, B, T, T, Hq, Hkv, hd, 1 / Math.sqrt(hd), 1, 0, 0, 0, T]
  const fwdFlops = (4 * B * Hq * T * T * hd) / 2
  const shape = `B=${B} T=${T} Hq=${Hq} Hkv=${Hkv} hd=${hd} causal`
  const fwd = () => exec("attention_fwd", [q, k, v, o, lse], args)
  const bwd = () => exec("attention_bwd", [q, k, v, o, lse, dO, dq, dk, dv], args)
  report("attention fwd", shape, fwdFlops, time(fwd))
  fwd()
  report("attention bwd", shape, 2.5 * fwdFlops, time(bwd))
  report(
    "attention fwd+bwd",
    shape,
    3.5 * fwdFlops,
    time(() => {
      fwd()
      bwd()
    }),
  )
  for (const id of [q, k, v, dO, o, lse, dq, dk, dv]) be.free(id)
}

be.free(elapsed)
be.dispose()
console.log(
  `${gpu.name} (${gpu.multiprocessors} SMs, compute ${gpu.computeCapability}), bf16, median of ${reps} runs`,
)
printTable(rows as unknown as Array<Record<string, string | number>>)
const path = writeResult("ops-gpu", gpu.name, {
  reps,
  runtimeVersion: probe.runtimeVersion,
  driverVersion: probe.driverVersion,
  cublasLt: probe.cublasLt,
  results: rows,
})
console.log(`wrote ${path}`)
