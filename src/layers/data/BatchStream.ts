/**
 * Training batches made off the main thread and ahead of the step.
 *
 * The process's lanes (rows of the global batch) are split round-robin over a few worker threads;
 * each worker reads, tokenizes and lays out the rows of its lanes, step after step, up to
 * `prefetch` steps ahead of the consumer, and posts each step's buffers (transferred, not
 * copied). `next()` takes one step from every worker and puts the rows in place. The time the
 * consumer spends waiting in `next()` is counted, so a benchmark can show the step never waits.
 *
 * The stream is a scoped resource: when its scope closes (after success, failure or
 * interruption) every worker is terminated and awaited.
 */
import { createRequire } from "node:module"
import * as path from "node:path"
import { pathToFileURL } from "node:url"
import { Worker } from "node:worker_threads"
import { Effect, Option, type Scope } from "effect"
import {
  assembleBatch,
  type BatchingOptions,
  type BatchPlan,
  batchPlanSync,
  checkPosition,
  type DataPosition,
  initialPosition,
  LaneGroup,
  type StepRows,
  splitLanes,
  type TrainBatch,
} from "../../core/data/batching.ts"
import { attemptSync } from "../../core/data/errors.ts"
import type { Tokenizer } from "../Tokenizer.ts"
import { DocumentTokens, driveStep } from "./documents.ts"
import { type DataError, decodeError, type FromWorker, isDataError, type ToWorker } from "./protocol.ts"
import { type DatasetIndex, DocumentReader } from "./reader.ts"

export interface BatchStreamOptions extends Omit<BatchingOptions, "padTokenId" | "eosTokenId"> {
  readonly dataset: DatasetIndex
  /** Its files are what the workers load. */
  readonly tokenizer: Tokenizer
  /** The tokenizer's pad token (or EOS) by default. */
  readonly padTokenId?: number
  /** Render lists of messages with the chat template. */
  readonly useChatTemplate?: boolean
  /** Continue after the batch this position was saved with. */
  readonly resume?: DataPosition
  /** Worker threads: 2 by default (at most one per row); 0 builds batches on the calling thread. */
  readonly workers?: number
  /** Steps each worker may build ahead of the consumer (default 4). */
  readonly prefetch?: number
}

export interface BatchStreamStats {
  readonly batches: number
  /** Targets counted by the loss, over all batches so far. */
  readonly tokens: number
  /** Total time `next()` waited for a batch to be ready, first batch included. */
  readonly waitedMs: number
  /** The wait for the first batch (its rows; the workers had started before). */
  readonly firstWaitMs: number
  /** Starting the workers: loading code and tokenizer, opening the dataset (0 without workers). */
  readonly startupMs: number
  /** Calls of `next()` that found no batch ready. */
  readonly waits: number
  readonly workers: number
}

export interface BatchStream {
  readonly plan: BatchPlan
  /** Padding mode: batches per epoch (the last, incomplete one dropped). Packing: undefined. */
  readonly stepsPerEpoch: number | undefined
  /** The next batch, or none after the last epoch (padding mode with `epochs`). Not for concurrent use. */
  readonly next: Effect.Effect<Option.Option<TrainBatch>, DataError>
  /** Where to resume to get the batch after the last one returned. */
  readonly position: Effect.Effect<DataPosition>
  readonly stats: Effect.Effect<BatchStreamStats>
}

// ---------------------------------------------------------------------------------------------
// Worker threads

let live = 0
/** Worker threads of all batch streams now running (for tests of clean-up). */
export const liveBatchWorkers = (): number => live

const workerEntry = new URL("./batchWorker.ts", import.meta.url).href
/**
 * The worker runs this TypeScript through tsx's loader, registered inside the thread: loader
 * hooks of the parent (tsx, vitest) do not reach worker threads on Node 20.
 */
const bootstrap = (): string => {
  const require = createRequire(import.meta.url)
  const api = pathToFileURL(
    path.join(path.dirname(require.resolve("tsx/package.json")), "dist/esm/api/index.mjs"),
  ).href
  return `import(${JSON.stringify(api)}).then((tsx) => { tsx.register(); return import(${JSON.stringify(workerEntry)}) })`
}

interface Channel {
  readonly worker: Worker
  readonly queue: StepRows[]
  ready: boolean
  ended: boolean
  failure: DataError | Error | undefined
}

const startWorkers = (count: number, onChange: () => void) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const code = bootstrap()
      const closing = { value: false }
      const channels: Channel[] = []
      for (let i = 0; i < count; i++) {
        const worker = new Worker(code, { eval: true, name: `magix-batches-${i}` })
        live++
        const ch: Channel = { worker, queue: [], ready: false, ended: false, failure: undefined }
        worker.on("message", (m: FromWorker) => {
          if (m.type === "ready") ch.ready = true
          else if (m.type === "rows") ch.queue.push(m.rows)
          else if (m.type === "end") ch.ended = true
          else ch.failure ??= decodeError(m.error)
          onChange()
        })
        worker.on("error", (e) => {
          ch.failure ??= e
          onChange()
        })
        worker.on("exit", (code) => {
          live--
          if (!closing.value) ch.failure ??= new Error(`batch worker ${i} exited with code ${code}`)
          onChange()
        })
        channels.push(ch)
      }
      return { channels, closing }
    }),
    ({ channels, closing }) =>
      Effect.promise(async () => {
        closing.value = true
        await Promise.all(channels.map((c) => c.worker.terminate()))
      }),
  )

/** Runs a promise whose typed errors fail the effect; anything else is a defect. */
const attemptPromise = <A>(f: () => Promise<A>): Effect.Effect<A, DataError> =>
  Effect.flatMap(
    Effect.promise(() =>
      f().then(
        (value) => ({ ok: true as const, value }),
        (error: unknown) => ({ ok: false as const, error }),
      ),
    ),
    (r) =>
      r.ok ? Effect.succeed(r.value) : isDataError(r.error) ? Effect.fail(r.error) : Effect.die(r.error),
  )

// ---------------------------------------------------------------------------------------------
// The stream

/** A batch stream over `dataset`, scoped: its workers stop when the scope closes. */
export const makeBatchStream = (
  options: BatchStreamOptions,
): Effect.Effect<BatchStream, DataError, Scope.Scope> =>
  Effect.gen(function* () {
    const { dataset, tokenizer } = options
    // Only the batching fields: the options also hold the tokenizer's functions, which cannot be posted.
    const { batchSize, maxLength, mode, seed, shuffle, processIndex, processCount, epochs } = options
    const batching: BatchingOptions = {
      batchSize,
      maxLength,
      ...(mode === undefined ? {} : { mode }),
      ...(seed === undefined ? {} : { seed }),
      ...(shuffle === undefined ? {} : { shuffle }),
      ...(processIndex === undefined ? {} : { processIndex }),
      ...(processCount === undefined ? {} : { processCount }),
      ...(epochs === undefined ? {} : { epochs }),
      padTokenId: options.padTokenId ?? tokenizer.padTokenId,
      ...(tokenizer.eosTokenId === undefined ? {} : { eosTokenId: tokenizer.eosTokenId }),
    }
    const plan = yield* attemptSync(() => batchPlanSync(dataset.count, batching), isDataError)
    const lanes = splitLanes(plan, 1)[0]!
    if (options.resume !== undefined) {
      const resume = options.resume
      yield* attemptSync(() => checkPosition(plan, resume, lanes), isDataError)
    }
    const workers = Math.min(options.workers ?? 2, plan.rows)
    const prefetch = Math.max(1, options.prefetch ?? 4)
    let position = options.resume ?? initialPosition(plan)
    const counters = { batches: 0, tokens: 0, waitedMs: 0, firstWaitMs: 0, startupMs: 0, waits: 0 }
    const account = (batch: TrainBatch, waited: number) => {
      if (counters.batches === 0) counters.firstWaitMs = waited
      counters.waitedMs += waited
      counters.batches++
      counters.tokens += batch.tokens
      position = batch.position
    }
    const common = {
      plan,
      stepsPerEpoch: plan.mode === "padding" ? plan.docsPerLane : undefined,
      position: Effect.sync(() => position),
      stats: Effect.sync((): BatchStreamStats => ({ ...counters, workers })),
    }

    if (workers <= 0) {
      const reader = new DocumentReader(dataset)
      yield* Effect.addFinalizer(() => Effect.sync(() => reader.close()))
      const documents = new DocumentTokens(reader, tokenizer, {
        useChatTemplate: options.useChatTemplate ?? false,
      })
      const group = yield* attemptSync(() => new LaneGroup(plan, lanes, options.resume), isDataError)
      const next = Effect.suspend(() => {
        if (group.done) return Effect.succeed(Option.none<TrainBatch>())
        const t0 = performance.now()
        return attemptPromise(() => driveStep(group, documents)).pipe(
          Effect.map((rows) => {
            const batch = assembleBatch(plan, [rows])
            account(batch, performance.now() - t0)
            return Option.some(batch)
          }),
        )
      })
      return { ...common, next } satisfies BatchStream
    }

    const started = performance.now()
    let wake: (() => void) | undefined
    const { channels } = yield* startWorkers(workers, () => wake?.())
    /** Waits (interruptibly) until `ready()` holds. */
    const until = (ready: () => boolean) =>
      Effect.callback<void>((resume) => {
        if (ready()) return resume(Effect.void)
        wake = () => {
          if (ready()) {
            wake = undefined
            resume(Effect.void)
          }
        }
        return Effect.sync(() => {
          wake = undefined
        })
      })
    const firstFailure = () => channels.find((c) => c.failure !== undefined && c.queue.length === 0)?.failure
    const failWith = (f: DataError | Error) => (isDataError(f) ? Effect.fail(f) : Effect.die(f))
    const send = (c: Channel, m: ToWorker) => c.worker.postMessage(m)

    const laneSets = splitLanes(plan, workers)
    channels.forEach((c, i) => {
      send(c, {
        type: "init",
        index: dataset,
        tokenizer: tokenizer.source,
        batching,
        lanes: laneSets[i]!,
        start: options.resume,
        useChatTemplate: options.useChatTemplate ?? false,
      })
    })
    yield* until(() => channels.every((c) => c.ready || c.failure !== undefined))
    const failed = firstFailure()
    if (failed !== undefined) return yield* failWith(failed)
    counters.startupMs = performance.now() - started
    for (const c of channels) send(c, { type: "produce", count: prefetch })

    let finished = false
    const next = Effect.suspend(() => {
      if (finished) return Effect.succeed(Option.none<TrainBatch>())
      const t0 = performance.now()
      const ready = () => channels.every((c) => c.queue.length > 0 || c.ended || c.failure !== undefined)
      if (!ready()) counters.waits++
      return until(ready).pipe(
        Effect.flatMap(() => {
          const failure = firstFailure()
          if (failure !== undefined) return failWith(failure)
          if (channels.some((c) => c.queue.length === 0)) {
            finished = true
            return Effect.succeed(Option.none<TrainBatch>())
          }
          const batch = assembleBatch(
            plan,
            channels.map((c) => c.queue.shift()!),
          )
          for (const c of channels) send(c, { type: "produce", count: 1 })
          account(batch, performance.now() - t0)
          return Effect.succeed(Option.some(batch))
        }),
      )
    })
    return { ...common, next } satisfies BatchStream
  })
