/**
 * The batch stream's throughput (src/layers/data/BatchStream.ts): tokens per second drained as
 * fast as possible with 0 (main thread), 1 and 2 tokenizing workers, on the tiny arithmetic set
 * (byte-level tokenizer) and on 8 MB of synthetic text (a BPE tokenizer with merges); and the time
 * a consumer whose step takes `--step-ms` (100 by default) waits for data after the first batch,
 * which the workers should bring to zero: tokenization runs ahead of the step.
 *   npx tsx bench/data-pipeline.ts [--step-ms 100]
 * Prints a table and writes bench/results/data-pipeline-<date>.json.
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { Effect, Option } from "effect"
import { makeBatchStream, openDataset } from "../src/layers/Dataset.ts"
import { Hub } from "../src/layers/Hub.ts"
import { loadTokenizer } from "../src/layers/Tokenizer.ts"
import { cpuName, printTable, writeResult } from "./report.ts"

const root = path.join(import.meta.dirname, "..")
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "magix-bench-"))
const stepIdx = process.argv.indexOf("--step-ms")
const stepMs = stepIdx > 0 ? Number(process.argv[stepIdx + 1]) : 100

const words = [
  "model",
  "mesh",
  "data",
  "shard",
  "the",
  "quick",
  "brown",
  "fox",
  "12345",
  "3.14",
  "Ünïcödé",
  "🙂",
]
/** Documents of 50 to 500 words, deterministic. */
const synthetic = (docs: number) => {
  let x = 1
  const rand = () => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0
    return x / 2 ** 32
  }
  const lines: string[] = []
  for (let d = 0; d < docs; d++) {
    const n = 50 + Math.floor(rand() * 450)
    lines.push(
      JSON.stringify({
        text: Array.from({ length: n }, () => words[Math.floor(rand() * words.length)]).join(" "),
      }),
    )
  }
  return `${lines.join("\n")}\n`
}

const measure = (
  file: string,
  tokenizerDir: string,
  options: {
    workers: number
    batchSize: number
    maxLength: number
    mode: "padding" | "packing"
    batches: number
    stepMs?: number
  },
) =>
  Effect.runPromise(
    Effect.scoped(
      Effect.gen(function* () {
        const dataset = yield* openDataset({ path: file })
        const tokenizer = yield* loadTokenizer(tokenizerDir, { addEosToken: true })
        const stream = yield* makeBatchStream({ dataset, tokenizer, ...options, prefetch: 8 })
        yield* stream.next // start-up and the first batch are not throughput
        const t0 = performance.now()
        let tokens = 0
        for (let k = 0; k < options.batches; k++) {
          const b = yield* stream.next
          if (Option.isNone(b)) break
          for (const m of b.value.attentionMask) tokens += m
          if (options.stepMs) yield* Effect.sleep(options.stepMs)
        }
        const seconds = (performance.now() - t0) / 1000
        const stats = yield* stream.stats
        return {
          tokensPerSecond: Math.round(tokens / seconds),
          startupMs: Math.round(stats.startupMs),
          firstWaitMs: Math.round(stats.firstWaitMs),
          waitedAfterFirstMs: Math.round(stats.waitedMs - stats.firstWaitMs),
          waits: stats.waits,
        }
      }),
    ).pipe(Effect.provide(Hub.localDirectory(tmp)), Effect.orDie),
  )

const rows: Array<Record<string, string | number>> = []
const row = (data: string, mode: string, workers: number, r: Awaited<ReturnType<typeof measure>>, step = 0) =>
  rows.push({
    data,
    mode,
    workers,
    "step ms": step,
    "tokens/s": r.tokensPerSecond,
    "startup ms": r.startupMs,
    "first wait ms": r.firstWaitMs,
    "waited after first ms": r.waitedAfterFirstMs,
  })

try {
  const tinyDir = path.join(root, "examples", "tiny")
  for (const mode of ["padding", "packing"] as const)
    for (const workers of [0, 1, 2])
      row(
        "arithmetic, B=32 T=64",
        mode,
        workers,
        await measure(path.join(tinyDir, "addition.jsonl"), tinyDir, {
          workers,
          batchSize: 32,
          maxLength: 64,
          mode,
          batches: 400,
        }),
      )
  const file = path.join(tmp, "synthetic.jsonl")
  fs.writeFileSync(file, synthetic(6000))
  const bpe = path.join(root, "test", "fixtures", "tokenizer", "bpe")
  const shape = { batchSize: 16, maxLength: 1024, mode: "packing" as const }
  for (const workers of [0, 1, 2])
    row(
      "synthetic 8 MB, B=16 T=1024",
      "packing",
      workers,
      await measure(file, bpe, { workers, ...shape, batches: 60 }),
    )
  // A consumer whose step takes stepMs needs 16·1024 tokens per step: with workers it should never wait.
  row(
    "synthetic 8 MB, B=16 T=1024",
    "packing",
    2,
    await measure(file, bpe, { workers: 2, ...shape, batches: 30, stepMs }),
    stepMs,
  )
  const device = cpuName()
  console.log(`${device}: the batch stream, prefetch 8`)
  printTable(rows)
  const last = rows.at(-1)!
  console.log(
    `a consumer stepping every ${stepMs} ms waited ${last["waited after first ms"]} ms in all over 29 steps after the first (${((Number(last["waited after first ms"]) / (29 * stepMs)) * 100).toFixed(1)}% of its time)`,
  )
  console.log(`wrote ${writeResult("data-pipeline", device, { rows })}`)
} finally {
  fs.rmSync(tmp, { recursive: true, force: true })
}
