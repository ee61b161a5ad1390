/**
 * Training throughput on one GPU: a Llama-3.2-1B-shaped model (random weights; vocabulary
 * 128256, 16 layers, width 2048, 32 heads, 8 KV heads) at sequence 2048, bf16 compute with
 * float32 master weights and AdamW. Prints tokens/s, TFLOP/s (6N + 12·L·d·T per token) and peak
 * memory, and writes bench/results/train-throughput-s<seq>-b<batch>-<date>.json.
 *
 * Every step gets a fresh batch (placement included in the time) from a fixed random process with
 * structure to learn: 4096 token ids spread over the vocabulary, each followed by one of 4 fixed
 * successors, so the loss can fall from ln(128256) ≈ 11.8 towards ln 4 ≈ 1.39. The run fails if
 * a loss is not finite or the last five steps' mean is not below the first five's.
 *   npx tsx bench/train-throughput.ts [--batch 8] [--seq 2048] [--steps 10] [--layers 16]
 *     [--model 3b] [--remat]       the Llama-3.2-3B shape; activation checkpointing
 *     [--no-graph]                 replay steps op by op instead of as a CUDA graph
 *     [--profile]                  also time every op of one extra step on the GPU (CUDA events)
 *     [--with baseline.json,...]   rows measured by bench/baselines/*.py in the same call
 * bench/train-compare.sh runs Magix, PyTorch eager, torch.compile and JAX side by side.
 */
import { existsSync, readFileSync } from "node:fs"
import { Effect, Layer } from "effect"
import { parameterCount, parseConfig } from "../src/core/config.ts"
import { disposeBatch, type HostTokenBatch, placeBatch } from "../src/core/models/batch.ts"
import { LlamaForCausalLM, type TokenBatch } from "../src/core/models/decoder.ts"
import { initParams } from "../src/core/models/init.ts"
import { adamw, chain, clipByGlobalNorm, initializeOptState, warmupCosine } from "../src/core/optim.ts"
import { type ShardedArray, shardToHostLater } from "../src/core/shardedArray.ts"
import { makeTrainStep } from "../src/core/train.ts"
import { CudaRuntime, createDeviceMesh, DefaultRuntime, Devices } from "../src/layers/Devices.ts"
import { flopsPerToken } from "../src/layers/Training.ts"
import { printTable, writeResult } from "./report.ts"
import { type OpTime, profileOps } from "./stepProfile.ts"

const arg = (name: string, fallback: number) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? Number(process.argv[i + 1]) : fallback
}
const B = arg("batch", 8)
const T = arg("seq", 2048)
const STEPS = arg("steps", 10)
const LAYERS = arg("layers", 16)
// --remat: activation checkpointing (each layer recomputed in the backward pass)
const REMAT = process.argv.includes("--remat")
// --model 3b: the Llama-3.2-3B shape (width 3072, 28 layers, 24 heads of 128, 8 KV heads)
const SHAPE = process.argv.includes("3b")
  ? {
      hidden_size: 3072,
      intermediate_size: 8192,
      num_hidden_layers: arg("layers", 28),
      num_attention_heads: 24,
      head_dim: 128,
    }
  : {
      hidden_size: 2048,
      intermediate_size: 8192,
      num_hidden_layers: LAYERS,
      num_attention_heads: 32,
      head_dim: 64,
    }
const WARMUP = 2
const PROFILE = process.argv.includes("--profile")

const program = Effect.gen(function* () {
  const devices = yield* Devices
  const { engine } = devices
  const mesh = yield* createDeviceMesh([1, 1])
  const config = yield* parseConfig({
    model_type: "llama",
    vocab_size: 128256,
    ...SHAPE,
    num_key_value_heads: 8,
    max_position_embeddings: 131072,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    rope_parameters: {
      rope_type: "llama3",
      rope_theta: 500000,
      factor: 32,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
  })
  const model = new LlamaForCausalLM(config)
  model.computeDtype = devices.platform === "cuda" ? "bfloat16" : "float32"
  const t0 = performance.now()
  const params = yield* initParams(model, engine, mesh, LlamaForCausalLM.partitionRules, { seed: 0 })
  const optimizer = chain(
    clipByGlobalNorm(1),
    adamw({ lr: warmupCosine({ peak: 3e-4, warmup: 10, total: 1000 }), weightDecay: 0.1 }),
  )
  const optState = yield* initializeOptState(optimizer, params, LlamaForCausalLM.partitionRules, mesh)
  const graph = devices.platform === "cuda" && !process.argv.includes("--no-graph")
  const step = makeTrainStep(model, optimizer, { remat: REMAT, graph })
  const cuda = devices.platform === "cuda"
  const clock = cuda ? engine.backend.alloc(0, 8) : undefined
  let state = 7
  const next = () => {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0
    return state >>> 8
  }
  const WORDS = 4096
  const tokenOf = Int32Array.from({ length: WORDS }, () => 3 + (next() % 128000))
  const successors = Int32Array.from({ length: WORDS * 4 }, () => next() % WORDS)
  const hostBatch = (): HostTokenBatch => {
    const ids = new Int32Array(B * T)
    for (let b = 0; b < B; b++) {
      let w = next() % WORDS
      for (let t = 0; t < T; t++) {
        ids[b * T + t] = tokenOf[w]!
        w = successors[w * 4 + (next() & 3)]!
      }
    }
    return {
      batchSize: B,
      length: T,
      inputIds: ids,
      positions: Int32Array.from(ids, (_, i) => i % T),
      targets: Int32Array.from(ids, (_, i) => (i % T === T - 1 ? -100 : ids[i + 1]!)),
    }
  }
  const losses: number[] = []
  const times: number[] = []
  // Per step: host time to hand the step to the device (placement excluded) and GPU time between
  // events recorded around it. With a graph the first is a launch; the GPU time is the step's.
  const enqueueMs: number[] = []
  const gpuMs: number[] = []
  // A step's loss is read after the next step is queued, so the host prepares step i + 1 while
  // the GPU runs step i.
  interface Pending {
    readonly loss: ShardedArray
    readonly read: () => number
    readonly batch: TokenBatch
  }
  let pending: Pending | undefined
  // The loss read starts as soon as its step is queued and finishes a step later, waiting for
  // that step only (a plain read would wait for the step queued after it too).
  const startRead = (loss: ShardedArray): (() => number) => {
    const finish = shardToHostLater(loss, 0)
    return () => Number(finish()[0])
  }
  const settle = (p: Pending) => {
    losses.push(p.read())
    p.loss.dispose()
    disposeBatch(p.batch)
  }
  // Event slots 800, 801, ... bracket the steps; their times are read once the run is done (a read
  // between steps would wait for the queued step too); the profiler below uses 1000 and 1001.
  const slotOf = (i: number) => (800 + 2 * i + 1 < 1000 ? 800 + 2 * i : undefined)
  for (let i = 0; i < WARMUP + STEPS; i++) {
    const s = performance.now()
    const { batch } = yield* placeBatch(engine, mesh, hostBatch())
    const slot = clock === undefined ? undefined : slotOf(i)
    if (slot !== undefined) engine.backend.exec("event_record", [], [0, slot])
    const e = performance.now()
    const out = yield* step(params, optState, batch)
    enqueueMs.push(performance.now() - e)
    if (slot !== undefined) engine.backend.exec("event_record", [], [0, slot + 1])
    const read = startRead(out.loss)
    if (pending) settle(pending)
    pending = { loss: out.loss, read, batch }
    times.push(performance.now() - s)
    if (i === 0)
      console.error(
        `first step (trace) ${(times[0]! / 1000).toFixed(1)} s, setup ${((s - t0) / 1000).toFixed(1)} s`,
      )
  }
  if (pending) settle(pending)
  if (clock !== undefined)
    for (let i = 0; i < WARMUP + STEPS; i++) {
      const slot = slotOf(i)
      if (slot === undefined) break
      engine.backend.exec("event_elapsed", [clock], [0, slot, slot + 1])
      gpuMs.push(new Float64Array(engine.backend.read(clock, 0, 8).slice().buffer)[0]!)
    }
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length
  // The training steps' peak, read before the profiled step below (another jit, beside the
  // graph's memory block, which would count both).
  const peak = (yield* devices.memory(0)).peak
  let ops: OpTime[] | undefined
  if (PROFILE && cuda) {
    // One more step, op by op (another jit of the same step, never a graph), every op timed.
    const plain = makeTrainStep(model, optimizer, { remat: REMAT, graph: false })
    for (let k = 0; k < 2; k++) {
      const { batch } = yield* placeBatch(engine, mesh, hostBatch())
      const run = () => Effect.runSync(plain(params, optState, batch))
      // The first call traces (eager, with TypeScript overhead); the second is the replay timed.
      const profiled =
        k === 0 ? undefined : profileOps(engine.backend, (b, f) => engine.withBackend(b, f), run)
      const out = profiled ? profiled.result : run()
      if (profiled) ops = profiled.ops
      out.loss.dispose()
      disposeBatch(batch)
    }
    plain.dispose()
  }
  const [first, last] = [mean(losses.slice(0, 5)), mean(losses.slice(-5))]
  const healthy = losses.every(Number.isFinite) && last < first
  console.log(
    `loss ${first.toFixed(3)} (first five) → ${last.toFixed(3)} (last five): ${healthy ? "falling, finite" : "NOT LEARNING"}`,
  )
  const measured = times.slice(WARMUP)
  const ms = mean(measured)
  const tps = (B * T * 1000) / ms
  if (clock !== undefined) engine.backend.free(clock)
  const profile = cuda
    ? {
        graph: {
          used: graph,
          launches: step.graphLaunches,
          nodes: step.graphNodes,
          captureError: step.graphError === undefined ? null : String(step.graphError),
          memory: step.graphMemory,
        },
        // Host time to hand one step to the device; a step with a host synchronisation inside
        // would wait for the GPU here.
        enqueueMs: enqueueMs.slice(WARMUP),
        gpuStepMs: gpuMs.slice(WARMUP),
        ...(ops
          ? {
              opSumMs: ops.reduce((a, o) => a + o.ms, 0),
              ops: ops.map((o) => ({ ...o, ms: Number(o.ms.toFixed(4)) })),
            }
          : {}),
      }
    : undefined
  const row = {
    framework: REMAT ? "magix-ts (remat)" : "magix-ts",
    batch: B,
    sequence: T,
    "step ms": ms,
    "tokens/s": Math.round(tps),
    "TFLOP/s": (tps * flopsPerToken(model, T)) / 1e12,
    "peak GiB": peak / 2 ** 30,
  }
  const withIdx = process.argv.indexOf("--with")
  const baselines = (withIdx > 0 ? process.argv[withIdx + 1]!.split(",") : []).map((file) =>
    existsSync(file)
      ? (JSON.parse(readFileSync(file, "utf8")) as Record<string, string | number>)
      : {
          framework: file.replace(/.*\//, "").replace(/\.json$/, ""),
          batch: B,
          sequence: T,
          "step ms": "failed (see log)",
        },
  )
  const pick = (r: Record<string, string | number>) =>
    Object.fromEntries(Object.keys(row).map((k) => [k, r[k] ?? ""])) as Record<string, string | number>
  // Magix's speed over each baseline's, measured in this same call.
  const ratio = (r: Record<string, string | number>) =>
    typeof r["tokens/s"] === "number" && r["tokens/s"] > 0
      ? `${(row["tokens/s"] / r["tokens/s"]).toFixed(2)}×`
      : ""
  printTable([{ ...row, "magix ×": "" }, ...baselines.map((b) => ({ ...pick(b), "magix ×": ratio(b) }))])
  if (profile) {
    const m = (xs: number[]) => (xs.length ? mean(xs) : Number.NaN)
    console.log(
      `graph ${graph ? `on: ${step.graphLaunches} launches, ${step.graphNodes.join("/")} nodes` : "off"}${profile.graph.captureError ? ` (capture failed: ${profile.graph.captureError})` : ""}; host enqueue ${m(profile.enqueueMs).toFixed(2)} ms, GPU ${m(profile.gpuStepMs).toFixed(1)} ms per step`,
    )
    for (const g of step.graphMemory)
      console.log(
        `graph memory, device ${g.device}: ${(g.planned / 2 ** 30).toFixed(2)} GiB planned for a step that has at most ${(g.peakLive / 2 ** 30).toFixed(2)} GiB live`,
      )
    if (ops) {
      const total = ops.reduce((a, o) => a + o.ms, 0)
      console.log(`ops of one step, each timed alone on the GPU: ${total.toFixed(1)} ms in all`)
      printTable(
        ops.slice(0, 25).map((o) => ({
          op: o.op,
          count: o.count,
          ms: o.ms.toFixed(2),
          share: `${((100 * o.ms) / total).toFixed(1)}%`,
        })),
      )
    }
  }
  console.log(`losses ${losses.map((l) => l.toFixed(3)).join(" ")}`)
  const device = devices.info[0]?.name ?? devices.platform
  console.log(
    `wrote ${writeResult(`train-throughput${process.argv.includes("3b") ? "-3b" : ""}${REMAT ? "-remat" : ""}${graph || !cuda ? "" : "-nograph"}${PROFILE ? "-profile" : ""}-s${T}-b${B}`, device, { model: process.argv.includes("3b") ? "Llama-3.2-3B shape" : "Llama-3.2-1B shape", ...SHAPE, parameters: parameterCount(config), remat: REMAT, ...row, healthy, losses, stepTimesMs: times, baselines, profile })}`,
  )
  if (!healthy) process.exitCode = 1
})

Effect.runPromise(
  program.pipe(
    Effect.scoped,
    Effect.provide(Layer.mergeAll(process.argv.includes("--cpu") ? DefaultRuntime() : CudaRuntime)),
  ),
)
