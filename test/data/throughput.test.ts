/**
 * Throughput of the batch stream (run with MAGIX_DATA_BENCH=1; skipped otherwise): tokens per
 * second drained as fast as possible with 0 (main thread), 1 and 2 workers, and the time a
 * consumer that "trains" for a while each step spends waiting for data.
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { Effect, Option } from "effect"
import { afterAll, describe, expect, it } from "vitest"
import { makeBatchStream, openDataset } from "../../src/layers/Dataset.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadTokenizer } from "../../src/layers/Tokenizer.ts"

const bench = process.env.MAGIX_DATA_BENCH !== undefined
const root = path.join(import.meta.dirname, "..", "..")
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "magix-bench-"))
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }))

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

describe.skipIf(!bench)("batch stream throughput", () => {
  it("tiny arithmetic dataset, byte-level tokenizer", async () => {
    const file = path.join(root, "examples", "tiny", "addition.jsonl")
    const tiny = path.join(root, "examples", "tiny")
    for (const mode of ["padding", "packing"] as const)
      for (const workers of [0, 1, 2]) {
        const r = await measure(file, tiny, { workers, batchSize: 32, maxLength: 64, mode, batches: 400 })
        console.log(`arithmetic ${mode} workers=${workers}`, JSON.stringify(r))
      }
  })

  it("synthetic text (8 MB), BPE tokenizer with merges", async () => {
    const file = path.join(tmp, "synthetic.jsonl")
    fs.writeFileSync(file, synthetic(6000))
    console.log("synthetic size MB", (fs.statSync(file).size / 2 ** 20).toFixed(1))
    const bpe = path.join(root, "test", "fixtures", "tokenizer", "bpe")
    for (const workers of [0, 1, 2]) {
      const r = await measure(file, bpe, {
        workers,
        batchSize: 16,
        maxLength: 1024,
        mode: "packing",
        batches: 60,
      })
      console.log(`synthetic packing B=16 T=1024 workers=${workers}`, JSON.stringify(r))
    }
    // A consumer whose step takes 100 ms needs 16·1024 tokens per 100 ms: it should never wait.
    const r = await measure(file, bpe, {
      workers: 2,
      batchSize: 16,
      maxLength: 1024,
      mode: "packing",
      batches: 30,
      stepMs: 100,
    })
    console.log("synthetic with a 100 ms step, workers=2", JSON.stringify(r))
    expect(r.waitedAfterFirstMs).toBeLessThan(100)
  })
})
