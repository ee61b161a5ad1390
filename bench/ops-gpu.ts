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
import { BF16, F32, openGpu, timeAttention } from "./gpuOps.ts"
import { printTable, writeResult } from "./report.ts"

const g = openGpu()
const { gpu, probe, exec, randomBuffer, emptyBuffer, reps, time, timeQueued } = g
const be = g.be

interface Row {
  op: string
  shape: string
  ms: number
  "TFLOP/s": number
  spread: number
  /** Matmuls: also timed ten calls queued back to back (per call), as in a graph replay. */
  "queued ms"?: number
  "queued TFLOP/s"?: number
  /** Of the issue's measured bf16 ceiling, 786 TFLOP/s (queued where measured). */
  "% of 786"?: number
}
const CEILING = 786
const rows: Row[] = []
type T = { ms: number; spread: number }
const report = (op: string, shape: string, flops: number, t: T, queued?: T) => {
  const tf = (ms: number) => flops / (ms / 1000) / 1e12
  rows.push({
    op,
    shape,
    ms: t.ms,
    "TFLOP/s": tf(t.ms),
    spread: t.spread,
    ...(queued
      ? {
          "queued ms": queued.ms,
          "queued TFLOP/s": tf(queued.ms),
          "% of 786": (100 * tf(queued.ms)) / CEILING,
        }
      : {}),
  })
  console.error(
    `${op} ${shape}: ${t.ms.toFixed(3)} ms, ${tf(t.ms).toFixed(1)} TFLOP/s${queued ? `; queued ${tf(queued.ms).toFixed(1)} TFLOP/s` : ""}`,
  )
}
/** A matmul timed both ways. */
const reportMatmul = (op: string, shape: string, flops: number, run: () => void) =>
  report(op, shape, flops, time(run), timeQueued(run))

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
  reportMatmul("matmul bf16", `${n}³`, 2 * n ** 3, () => exec("matmul", [a, b, cbuf], mm(n, n, n, 0, 0)))
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
  reportMatmul("linear fwd", shape, flops, () => exec("matmul", [x, w, y], mm(tokens, dout, din, 0, 1)))
  // dx = dy·W: M tokens, N in, K out
  reportMatmul("linear dgrad", shape, flops, () => exec("matmul", [y, w, dx], mm(tokens, din, dout, 0, 0)))
  // dW = dyᵀ·x: M out, N in, K tokens, float32 out
  reportMatmul("linear wgrad", shape, flops, () =>
    exec("matmul", [y, x, dw], mm(dout, din, tokens, 1, 0, F32)),
  )
  for (const id of [x, w, y, dx, dw]) be.free(id)
}

// ---- attention ----
for (const shape of [
  [8, 2048, 32, 8, 64],
  [8, 2048, 16, 8, 128],
] as const) {
  const [B, T, Hq, Hkv, hd] = shape
  const t = timeAttention(g, shape)
  const name = `B=${B} T=${T} Hq=${Hq} Hkv=${Hkv} hd=${hd} causal`
  report("attention fwd", name, t.flops, t.forward)
  report("attention bwd", name, 2.5 * t.flops, t.backward)
  report("attention fwd+bwd", name, 3.5 * t.flops, t.both)
}

g.close()
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
