/**
 * Throughput of the CPU backend's heaviest kernels: square float32 matmuls and attention
 * (B = 1, T = 512, 8 heads of 64), forward and backward, causal and not. FLOP counts are the
 * useful work: 2·M·N·K for a matmul; 4·B·H·T·S·hd for attention's forward pass and 2.5 times
 * that for its backward (which recomputes q·kᵀ), halved when causal.
 *   npx tsx bench/ops-cpu.ts        (MAGIX_NUM_THREADS sets the thread count)
 */
import type { Backend } from "../src/core/backend.ts"
import { adaptNativeBackend } from "../src/layers/nativeBackend.ts"
import { loadNative } from "../src/native/index.ts"
import { cpuName, printTable } from "./report.ts"

const addon = loadNative()
const backend: Backend = adaptNativeBackend(addon, addon.createCpu(1))

const buffer = (n: number) => {
  const id = backend.alloc(0, n * 4)
  backend.write(
    id,
    0,
    Float32Array.from({ length: n }, () => Math.random() - 0.5),
  )
  return id
}

/** Median seconds of `run` over enough repetitions to fill about a second. */
const time = (run: () => void): number => {
  run()
  const t0 = performance.now()
  run()
  const once = Math.max(1e-3, (performance.now() - t0) / 1000)
  const reps = Math.max(3, Math.min(50, Math.round(1 / once)))
  const times: number[] = []
  for (let i = 0; i < reps; i++) {
    const s = performance.now()
    run()
    times.push((performance.now() - s) / 1000)
  }
  times.sort((a, b) => a - b)
  return times[Math.floor(times.length / 2)]!
}

const rows: Array<Record<string, string | number>> = []
const report = (op: string, shape: string, flops: number, seconds: number) =>
  rows.push({ op, shape, ms: seconds * 1000, "GFLOP/s": flops / seconds / 1e9 })

for (const n of [256, 512, 1024]) {
  const [a, b, c] = [buffer(n * n), buffer(n * n), buffer(n * n)]
  for (const [ta, tb] of [
    [0, 0],
    [0, 1],
    [1, 0],
  ] as const) {
    const args = [0, 1, n, n, n, ta, tb, 1, 0, n, n, n, 0, 0, 0, 0, 0, 0]
    const s = time(() => backend.exec("matmul", [a, b, c], args))
    report(`matmul${ta ? " Aᵀ" : ""}${tb ? " Bᵀ" : ""}`, `${n}×${n}×${n}`, 2 * n * n * n, s)
  }
  for (const id of [a, b, c]) backend.free(id)
}

{
  const [B, T, H, hd] = [1, 512, 8, 64]
  const n = B * T * H * hd
  const [q, k, v, o, dO, dq, dk, dv] = Array.from({ length: 8 }, () => buffer(n))
  const lse = buffer(B * H * T)
  for (const causal of [0, 1]) {
    const args = [0, B, T, T, H, H, hd, 1 / Math.sqrt(hd), causal, 0, 0, 0, T]
    const work = (4 * B * H * T * T * hd) / (causal ? 2 : 1)
    const shape = `B=${B} T=${T} H=${H} hd=${hd}${causal ? " causal" : ""}`
    report(
      "attention_fwd",
      shape,
      work,
      time(() => backend.exec("attention_fwd", [q!, k!, v!, o!, lse], args)),
    )
    const bwd = [q!, k!, v!, o!, lse, dO!, dq!, dk!, dv!]
    report(
      "attention_bwd",
      shape,
      2.5 * work,
      time(() => backend.exec("attention_bwd", bwd, args)),
    )
  }
  for (const id of [q, k, v, o, dO, dq, dk, dv, lse]) backend.free(id!)
}

console.log(`${cpuName()}, ${addon.cpuThreads()} threads, float32`)
printTable(rows)
