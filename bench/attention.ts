/**
 * Causal grouped-query attention, bf16, forward, backward and both: Magix's kernels next to
 * PyTorch's scaled_dot_product_attention (flash backend, and cuDNN where it runs) on the same
 * shapes in the same call (issue 8: at least SDPA flash's throughput at head size 64 and 128).
 * FLOPs: 4·B·Hq·T²·hd/2 forward, 2.5 times that backward.
 *   npx tsx bench/attention.ts [--no-baseline]      (MAGIX_BENCH_REPS timed runs, default 20)
 * Prints a table with the ratio to SDPA flash and writes bench/results/attention-<date>.json.
 */
import { spawnSync } from "node:child_process"
import { openGpu, timeAttention } from "./gpuOps.ts"
import { printTable, writeResult } from "./report.ts"

const shapes = [
  [8, 2048, 32, 8, 64],
  [8, 2048, 16, 8, 128],
  [2, 8192, 32, 8, 64],
  [2, 8192, 16, 8, 128],
] as const
type Shape = (typeof shapes)[number]
const key = (s: ReadonlyArray<number>) => s.join(",")

interface Baseline {
  readonly shape: ReadonlyArray<number>
  readonly backend: string
  readonly forwardMs?: number
  readonly backwardMs?: number
  readonly bothMs?: number
  readonly error?: string
}

const g = openGpu()
const ours = new Map<string, ReturnType<typeof timeAttention>>()
for (const s of shapes) ours.set(key(s), timeAttention(g, s))
g.close()

let torch: { torch: string; device: string; rows: ReadonlyArray<Baseline> } | undefined
if (!process.argv.includes("--no-baseline")) {
  const r = spawnSync(
    "python3",
    ["bench/baselines/sdpa_attention.py", "--reps", String(g.reps), "--shapes", ...shapes.map(key)],
    { encoding: "utf8", maxBuffer: 1 << 24 },
  )
  if (r.status === 0) torch = JSON.parse(r.stdout.trim().split("\n").at(-1)!)
  else console.error(`the PyTorch baseline failed (${r.status}): ${r.stderr.slice(-800)}`)
}

const tflops = (flops: number, ms: number | undefined) =>
  ms === undefined ? Number.NaN : flops / (ms / 1000) / 1e12
const rows: Array<Record<string, string | number>> = []
const results: Array<Record<string, unknown>> = []
for (const s of shapes) {
  const [B, T, Hq, Hkv, hd] = s as Shape
  const m = ours.get(key(s))!
  const base = (backend: string) => torch?.rows.find((r) => r.backend === backend && key(r.shape) === key(s))
  const flash = base("flash")
  const cudnn = base("cudnn")
  const name = `B=${B} T=${T} ${Hq}/${Hkv}×${hd}`
  for (const [pass, factor, mine, ref, alt] of [
    ["fwd", 1, m.forward.ms, flash?.forwardMs, cudnn?.forwardMs],
    ["bwd", 2.5, m.backward.ms, flash?.backwardMs, cudnn?.backwardMs],
    ["fwd+bwd", 3.5, m.both.ms, flash?.bothMs, cudnn?.bothMs],
  ] as const) {
    const f = factor * m.flops
    rows.push({
      shape: name,
      pass,
      "magix TFLOP/s": tflops(f, mine),
      "sdpa flash": tflops(f, ref),
      "sdpa cudnn": tflops(f, alt),
      "× flash": ref === undefined ? "" : (ref / mine).toFixed(2),
    })
  }
  results.push({
    shape: { B, T, Hq, Hkv, hd, causal: true, dtype: "bfloat16" },
    forwardFlops: m.flops,
    magix: { forward: m.forward, backward: m.backward, both: m.both },
    sdpaFlash: flash,
    sdpaCudnn: cudnn,
  })
}
console.log(
  `${g.gpu.name}, causal bf16 attention, median of ${g.reps} runs${torch ? `; PyTorch ${torch.torch}` : ""}`,
)
printTable(rows)
console.log(`wrote ${writeResult("attention", g.gpu.name, { reps: g.reps, torch: torch?.torch, results })}`)
