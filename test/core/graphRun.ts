/**
 * The train run the graph tests share (CPU in test/core/graph.test.ts, CUDA in
 * test/gpu/graph.test.ts): steps of the llama fixture, each on another batch, with the step
 * replayed as a graph or op by op; what each step returned and what memory the graph kept.
 */
import { Effect } from "effect"
import type { Backend } from "../../src/core/backend.ts"
import type { DType } from "../../src/core/dtype.ts"
import { placeBatch } from "../../src/core/models/batch.ts"
import { LlamaForCausalLM } from "../../src/core/models/decoder.ts"
import { adamw, chain, clipByGlobalNorm, initializeOptState } from "../../src/core/optim.ts"
import { shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { makeTrainStep } from "../../src/core/train.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { mesh } from "../helpers.ts"
import { makeBatch } from "../parallel/equivalenceRun.ts"

export const graphTrainRun = (options: {
  readonly graph: boolean
  readonly steps: number
  readonly meshShape: [number, number]
  readonly computeDtype?: DType
}) =>
  Effect.gen(function* () {
    const { engine } = yield* Devices
    const m = mesh(options.meshShape)
    const { model, params } = yield* loadModelHub(
      LlamaForCausalLM,
      "llama",
      LlamaForCausalLM.partitionRules,
      m,
    )
    if (options.computeDtype) model.computeDtype = options.computeDtype
    const opt = chain(clipByGlobalNorm(1), adamw({ lr: 1e-2 }))
    const st = yield* initializeOptState(opt, params, LlamaForCausalLM.partitionRules, m)
    const step = makeTrainStep(model, opt, { graph: options.graph })
    const host = makeBatch(model.config.vocabSize)
    const losses: number[] = []
    const results = []
    const memory = { replayPeak: 0, graphHeld: 0 }
    for (let s = 0; s < options.steps; s++) {
      // Another batch every step: a graph that kept reading the first one would show.
      const ids = host.inputIds.map((t, i) => (t === 0 ? 0 : 3 + ((t + 7 * s + i) % 200)))
      const { batch } = yield* placeBatch(engine, m, { ...host, inputIds: ids })
      const before = engine.backend.stats(0).inUse
      engine.backend.resetPeak(0)
      const out = yield* step(params, st, batch)
      // Step 2 replays op by op: its transient peak is what a step needs; step 3 captures and
      // keeps the graph's memory.
      if (s === 1) memory.replayPeak = engine.backend.stats(0).peak - before
      if (s === 2) memory.graphHeld = engine.backend.stats(0).inUse - before
      losses.push(Number(shardToHost(out.loss, 0)[0]))
      results.push(out.loss)
    }
    // Each step's result is its own: later launches did not overwrite earlier ones.
    const kept = results.map((l) => Number(shardToHost(l, 0)[0]))
    const counts = {
      launches: step.graphLaunches,
      nodes: step.graphNodes,
      error: step.graphError === undefined ? undefined : String(step.graphError),
    }
    step.dispose()
    return {
      losses,
      kept,
      counts,
      memory,
      params: Object.entries(params).map(([k, a]) => [k, toHost(a) as Float32Array] as const),
    }
  })

/**
 * Captures y = x + y on `b` and launches it twice: y as the capture left it (a capture runs
 * nothing), after one launch and after two, and the graph's node count.
 */
export const launchTwice = (b: Backend) => {
  const g = b.graphs!
  const x = b.alloc(0, 16)
  const y = b.alloc(0, 16)
  const read = () => Array.from(new Float32Array(b.read(y, 0, 16).slice().buffer))
  b.write(x, 0, new Float32Array([1, 2, 3, 4]))
  b.write(y, 0, new Float32Array([10, 20, 30, 40]))
  g.begin()
  b.exec("axpby", [x, y], [0, 4, 1, 1])
  const id = g.end()
  const afterCapture = read()
  g.launch(id)
  const once = read()
  g.launch(id)
  const twice = read()
  const nodes = g.nodes(id)
  g.destroy(id)
  b.free(x)
  b.free(y)
  return { afterCapture, once, twice, nodes }
}
