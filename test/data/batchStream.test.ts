/**
 * The batch stream with worker threads: its batches equal those built on the main thread and by
 * the pure iterator, it resumes from a saved position, a worker's typed error arrives typed, and
 * closing the scope (also by interruption) terminates the workers.
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { Effect, Exit, Fiber, Latch, Option } from "effect"
import { afterAll, describe, expect, it } from "vitest"
import {
  batchIterator,
  batchPlanSync,
  type DataPosition,
  type TrainBatch,
} from "../../src/core/data/batching.ts"
import {
  type BatchStreamOptions,
  exampleTokens,
  liveBatchWorkers,
  makeBatchStream,
  openDataset,
  readExamples,
} from "../../src/layers/Dataset.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadTokenizer, type Tokenizer } from "../../src/layers/Tokenizer.ts"

const root = path.join(import.meta.dirname, "..", "..")
const tiny = path.join(root, "examples", "tiny")
const arithmetic = path.join(tiny, "addition.jsonl")
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "magix-stream-test-"))
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }))

const run = <A, E>(effect: Effect.Effect<A, E, Hub>) =>
  Effect.runPromise(effect.pipe(Effect.provide(Hub.localDirectory(tmp)), Effect.orDie))

const setup = (file: string, tokenizerDir = tiny, field = "text") =>
  run(Effect.all([openDataset({ path: file, field }), loadTokenizer(tokenizerDir, { addEosToken: true })]))

type Options = Omit<BatchStreamOptions, "dataset" | "tokenizer">

/** The first `count` batches of a stream (fewer if it ends), and its position and stats after them. */
const streamBatches = (
  dataset: BatchStreamOptions["dataset"],
  tokenizer: Tokenizer,
  options: Options,
  count: number,
) =>
  Effect.runPromise(
    Effect.scoped(
      Effect.gen(function* () {
        const stream = yield* makeBatchStream({ dataset, tokenizer, ...options })
        const out: TrainBatch[] = []
        for (let k = 0; k < count; k++) {
          const b = yield* stream.next
          if (Option.isNone(b)) break
          out.push(b.value)
        }
        return { batches: out, position: yield* stream.position, stats: yield* stream.stats }
      }),
    ),
  )

const content = (b: TrainBatch) => ({
  inputIds: Array.from(b.inputIds),
  targets: Array.from(b.targets),
  positions: Array.from(b.positions),
  attentionMask: Array.from(b.attentionMask),
  tokens: b.tokens,
  step: b.step,
  position: b.position,
})

describe("batch stream", () => {
  for (const mode of ["padding", "packing"] as const)
    it(`gives from 2 workers the batches of the main thread and of the pure iterator (${mode})`, async () => {
      const [dataset, tokenizer] = await setup(arithmetic)
      const options: Options = { batchSize: 8, maxLength: 16, mode, seed: 7, prefetch: 3 }
      const fromWorkers = await streamBatches(dataset, tokenizer, { ...options, workers: 2 }, 30)
      const inline = await streamBatches(dataset, tokenizer, { ...options, workers: 0 }, 30)
      expect(fromWorkers.batches.length).toBe(30)
      expect(fromWorkers.batches.map(content)).toEqual(inline.batches.map(content))
      // The pure iterator over the same tokens.
      const rows = await Effect.runPromise(
        readExamples(
          dataset,
          Array.from({ length: dataset.count }, (_, i) => i),
        ),
      )
      const tokens = rows.map((r) => exampleTokens(tokenizer, r.example, r.at, "text"))
      const plan = batchPlanSync(dataset.count, {
        ...options,
        padTokenId: tokenizer.padTokenId,
        eosTokenId: tokenizer.eosTokenId!,
      })
      const it = batchIterator(plan, (d) => tokens[d]!)
      expect(fromWorkers.batches.map(content)).toEqual(Array.from({ length: 30 }, () => content(it.next()!)))
      expect(fromWorkers.stats.workers).toBe(2)
      expect(fromWorkers.stats.batches).toBe(30)
      expect(fromWorkers.stats.tokens).toBe(fromWorkers.batches.reduce((n, b) => n + b.tokens, 0))
      expect(liveBatchWorkers()).toBe(0)
    })

  it("ends after the last epoch in padding mode", async () => {
    const [dataset, tokenizer] = await setup(arithmetic)
    const { batches } = await streamBatches(
      dataset,
      tokenizer,
      { batchSize: 16, maxLength: 16, epochs: 2 },
      100,
    )
    expect(batches.length).toBe(2 * Math.floor(100 / 16))
    expect(batches.at(-1)!.position.epoch).toBe(2)
  })

  it("resumes through the workers from the position saved after k batches", async () => {
    const [dataset, tokenizer] = await setup(arithmetic)
    for (const mode of ["padding", "packing"] as const) {
      const options: Options = { batchSize: 4, maxLength: 12, mode, workers: 2 }
      // The uninterrupted run on the main thread (the same batches, as the first test shows).
      const straight = await streamBatches(dataset, tokenizer, { ...options, workers: 0 }, 60)
      const saved: DataPosition = JSON.parse(JSON.stringify(straight.batches[46]!.position))
      const resumed = await streamBatches(dataset, tokenizer, { ...options, resume: saved }, 13)
      expect(resumed.batches.map(content)).toEqual(straight.batches.slice(47).map(content))
    }
  })

  it("renders chats with the template in the workers as on the main thread", async () => {
    const [dataset, tokenizer] = await setup(
      path.join(root, "test", "fixtures", "parquet", "rows-snappy.parquet"),
      path.join(root, "test", "fixtures", "tokenizer", "bpe"),
      "messages",
    )
    const options: Options = { batchSize: 4, maxLength: 24, mode: "packing", useChatTemplate: true }
    const a = await streamBatches(dataset, tokenizer, { ...options, workers: 2 }, 10)
    const b = await streamBatches(dataset, tokenizer, { ...options, workers: 0 }, 10)
    expect(a.batches.map(content)).toEqual(b.batches.map(content))
    expect(tokenizer.decode(a.batches[0]!.inputIds.subarray(0, 24))).toContain("<|user|>")
  })

  it("surfaces a malformed line met in a worker as the typed error, with its line", async () => {
    const lines = Array.from({ length: 40 }, (_, i) =>
      i === 22 ? '{"text": broken' : JSON.stringify({ text: `${i}+1` }),
    )
    const file = path.join(tmp, "broken.jsonl")
    fs.writeFileSync(file, lines.join("\n"))
    const [dataset, tokenizer] = await setup(file)
    const exit = await Effect.runPromiseExit(
      Effect.scoped(
        Effect.gen(function* () {
          const stream = yield* makeBatchStream({
            dataset,
            tokenizer,
            batchSize: 4,
            maxLength: 8,
            workers: 2,
          })
          for (let k = 0; k < 10; k++) yield* stream.next
        }),
      ),
    )
    expect(Exit.isFailure(exit)).toBe(true)
    const error = Exit.isFailure(exit) ? exit.cause.reasons.find((r) => r._tag === "Fail") : undefined
    expect(error?._tag).toBe("Fail")
    const e = (error as { error: { _tag: string; line: number; file: string; message: string } }).error
    expect(e._tag).toBe("DatasetParseError")
    expect(e.line).toBe(23)
    expect(e.file).toBe(file)
    expect(e.message).toContain("line 23")
    expect(liveBatchWorkers()).toBe(0)
  })

  it("terminates its workers when the scope closes, also on interruption", async () => {
    const [dataset, tokenizer] = await setup(arithmetic)
    const seen = await Effect.runPromise(
      Effect.gen(function* () {
        const started = yield* Latch.make()
        const fiber = yield* Effect.forkChild(
          Effect.scoped(
            Effect.gen(function* () {
              const stream = yield* makeBatchStream({
                dataset,
                tokenizer,
                batchSize: 8,
                maxLength: 16,
                workers: 2,
              })
              yield* stream.next
              yield* Latch.open(started)
              return yield* Effect.never
            }),
          ),
        )
        yield* Latch.await(started)
        const during = liveBatchWorkers()
        yield* Fiber.interrupt(fiber)
        return { during, after: liveBatchWorkers() }
      }),
    )
    expect(seen).toEqual({ during: 2, after: 0 })
  })

  it("checks options and a resumed position before starting workers", async () => {
    const [dataset, tokenizer] = await setup(arithmetic)
    const e = await Effect.runPromise(
      Effect.flip(
        Effect.scoped(makeBatchStream({ dataset, tokenizer, batchSize: 6, maxLength: 8, processCount: 4 })),
      ),
    )
    expect(e._tag).toBe("BatchingOptionsInvalid")
    const { batches } = await streamBatches(dataset, tokenizer, { batchSize: 4, maxLength: 8, workers: 0 }, 1)
    const e2 = await Effect.runPromise(
      Effect.flip(
        Effect.scoped(
          makeBatchStream({ dataset, tokenizer, batchSize: 4, maxLength: 9, resume: batches[0]!.position }),
        ),
      ),
    )
    expect(e2._tag).toBe("DataPositionMismatch")
    expect(liveBatchWorkers()).toBe(0)
  })
})
