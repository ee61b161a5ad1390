/**
 * A tokenization worker thread: rebuilds the tokenizer from its files, opens the dataset through
 * the shared index, and builds the rows of its lanes one step after another, as far ahead as the
 * main thread has granted ("produce" credits), posting each step's buffers without copying them.
 */
import { parentPort } from "node:worker_threads"
import { batchPlanSync, LaneGroup } from "../../core/data/batching.ts"
import { tokenizerFromSource } from "../Tokenizer.ts"
import { DocumentTokens, driveStep } from "./documents.ts"
import { encodeError, type FromWorker, type ToWorker } from "./protocol.ts"
import { DocumentReader } from "./reader.ts"

const port = parentPort
if (port === null) throw new Error("batchWorker.ts runs only as a worker thread")

const post = (message: FromWorker, transfer: ReadonlyArray<ArrayBuffer> = []) =>
  port.postMessage(message, transfer as ArrayBuffer[])

let group: LaneGroup | undefined
let documents: DocumentTokens | undefined
let credits = 0
let running = false
let stopped = false

const fail = (e: unknown) => {
  stopped = true
  post({ type: "error", error: encodeError(e) })
}

const run = async () => {
  if (running || group === undefined || documents === undefined) return
  running = true
  try {
    while (credits > 0 && !stopped) {
      if (group.done) {
        stopped = true
        post({ type: "end" })
        break
      }
      const rows = await driveStep(group, documents)
      credits--
      post({ type: "rows", rows }, [
        rows.inputIds.buffer as ArrayBuffer,
        rows.targets.buffer as ArrayBuffer,
        rows.positions.buffer as ArrayBuffer,
        rows.attentionMask.buffer as ArrayBuffer,
      ])
    }
  } catch (e) {
    fail(e)
  } finally {
    running = false
  }
}

port.on("message", (message: ToWorker) => {
  if (stopped) return
  try {
    if (message.type === "init") {
      const tokenizer = tokenizerFromSource(message.tokenizer)
      const reader = new DocumentReader(message.index)
      documents = new DocumentTokens(reader, tokenizer, { useChatTemplate: message.useChatTemplate })
      group = new LaneGroup(
        batchPlanSync(message.index.count, message.batching),
        message.lanes,
        message.start,
      )
      post({ type: "ready" })
    } else {
      credits += message.count
      void run()
    }
  } catch (e) {
    fail(e)
  }
})
