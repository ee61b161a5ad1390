/**
 * The train step's kept compute-dtype copies of the parameters (StepOptions.shadows): the
 * optimizer writes them with each update and the forward pass reads them instead of casting every
 * master weight. On the CPU the llama fixture trains in float64 master weights with float32
 * compute (the GPU's float32 → bfloat16 in miniature): the same losses and parameters bit for bit
 * as casting every step, on one device and sharded over a 2×2 mesh, replayed op by op and as a
 * graph, across parameters replaced by other arrays (a checkpoint restore) and parameters written
 * in place outside the step (resyncShadows); and the forward casts are gone. A LoRA step casts
 * its frozen base once, at the trace, and trains the adapters bit for bit as before.
 */
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { defaultLoraRules, initLora } from "../../src/core/lora.ts"
import { placeBatch } from "../../src/core/models/batch.ts"
import { LlamaForCausalLM, type Params } from "../../src/core/models/decoder.ts"
import { adamw, chain, clipByGlobalNorm, initializeOptState } from "../../src/core/optim.ts"
import { copyOverlaps, fromHost, shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { makeLoraTrainStep, makeTrainStep } from "../../src/core/train.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { countOps, mesh, runCpu } from "../helpers.ts"
import { makeBatch } from "../parallel/equivalenceRun.ts"

const STEPS = 5
const rules = LlamaForCausalLM.partitionRules

interface RunOptions {
  readonly shadows: boolean
  readonly graph: boolean
  readonly meshShape: [number, number]
  /** The fixture: "llama", or "llama3" (tied embeddings: the head casts the embedding again). */
  readonly fixture?: string
  /** Before this step, every parameter is replaced by a fresh copy (as a restore makes them). */
  readonly restoreAt?: number
  /** Before this step, one parameter is scaled in place from outside the step. */
  readonly pokeAt?: number
}

const run = (o: RunOptions) =>
  runCpu(
    o.meshShape[0] * o.meshShape[1],
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh(o.meshShape)
      const loaded = yield* loadModelHub(LlamaForCausalLM, o.fixture ?? "llama", rules, m, {
        dtype: "float64",
      })
      const model = loaded.model
      let params: Params = loaded.params
      model.computeDtype = "float32"
      const opt = chain(clipByGlobalNorm(1), adamw({ lr: 1e-2, weightDecay: 0.1 }))
      const st = yield* initializeOptState(opt, params, rules, m)
      const step = makeTrainStep(model, opt, { graph: o.graph, shadows: o.shadows })
      // Counts the casts each step runs (replays and graph launches go through the same backend).
      const ops = countOps(engine.backend)
      const host = makeBatch(model.config.vocabSize)
      const losses: number[] = []
      const castsPerStep: number[] = []
      try {
        for (let s = 0; s < STEPS; s++) {
          if (s === o.restoreAt) {
            const fresh: Record<string, (typeof params)[string]> = {}
            for (const [name, p] of Object.entries(params)) {
              fresh[name] = yield* fromHost(engine, toHost(p), p.shape, p.dtype, p.sharding)
              p.dispose()
            }
            params = fresh
          }
          if (s === o.pokeAt) {
            const name = "model.layers.0.self_attn.q_proj.weight"
            const p = params[name]!
            const scaled = Float64Array.from(toHost(p) as Float64Array, (x) => 0.5 * x)
            const src = yield* fromHost(engine, scaled, p.shape, p.dtype, p.sharding)
            copyOverlaps(src, p)
            src.dispose()
            step.resyncShadows()
          }
          const ids = host.inputIds.map((t, i) => (t === 0 ? 0 : 3 + ((t + 7 * s + i) % 200)))
          const { batch } = yield* placeBatch(engine, m, { ...host, inputIds: ids })
          ops.reset()
          const out = yield* step(params, st, batch)
          castsPerStep.push(ops.count("cast"))
          losses.push(Number(shardToHost(out.loss, 0)[0]))
          out.loss.dispose()
        }
      } finally {
        ops.restore()
      }
      const result = {
        losses,
        castsPerStep,
        paramCount: Object.keys(params).length,
        launches: step.graphLaunches,
        params: Object.entries(params).map(([k, a]) => [k, Array.from(toHost(a) as Float64Array)] as const),
        mu: Object.entries(st.mu).map(([k, a]) => [k, Array.from(toHost(a) as Float64Array)] as const),
      }
      step.dispose()
      return result
    }),
  )

const expectSame = (a: Awaited<ReturnType<typeof run>>, b: Awaited<ReturnType<typeof run>>) => {
  expect(a.losses).toEqual(b.losses)
  expect(new Set(a.losses).size).toBe(STEPS)
  for (const [i, [name, p]] of b.params.entries()) expect(a.params[i]![1], name).toEqual(p)
  for (const [i, [name, m]] of b.mu.entries()) expect(a.mu[i]![1], `mu.${name}`).toEqual(m)
}

describe("train-step shadows of the parameters", () => {
  it.each([
    [[1, 1], false],
    [[1, 1], true],
    [[2, 2], false],
    [[2, 2], true],
  ] as Array<[[number, number], boolean]>)(
    "mesh %j, graph %s: bit for bit as casting every step",
    async (meshShape, graph) => {
      const cast = await run({ shadows: false, graph, meshShape })
      const kept = await run({ shadows: true, graph, meshShape })
      expectSame(kept, cast)
      if (graph) expect(kept.launches).toBe(STEPS - 2)
      // The first call casts every parameter once; later ones cast only cotangents back.
      expect(kept.castsPerStep[0]).toBe(cast.castsPerStep[0])
      for (let s = 1; s < STEPS; s++) {
        if (graph && s >= 2) continue // a graph launch runs no backend calls to count
        expect(cast.castsPerStep[s]! - kept.castsPerStep[s]!).toBeGreaterThanOrEqual(
          kept.paramCount * meshShape[0] * meshShape[1],
        )
      }
    },
  )

  it.each([false, true])("tied embeddings (llama3 fixture), graph %s", async (graph) => {
    const cast = await run({ shadows: false, graph, meshShape: [1, 1], fixture: "llama3" })
    const kept = await run({ shadows: true, graph, meshShape: [1, 1], fixture: "llama3" })
    expectSame(kept, cast)
    expect(cast.castsPerStep[1]! - kept.castsPerStep[1]!).toBeGreaterThanOrEqual(kept.paramCount)
  })

  it.each([false, true])("parameters replaced mid-run (a restore), graph %s", async (graph) => {
    const cast = await run({ shadows: false, graph, meshShape: [2, 2], restoreAt: 3 })
    const kept = await run({ shadows: true, graph, meshShape: [2, 2], restoreAt: 3 })
    expectSame(kept, cast)
  })

  it.each([false, true])("parameters written in place, then resyncShadows, graph %s", async (graph) => {
    const cast = await run({ shadows: false, graph, meshShape: [1, 1], pokeAt: 3 })
    const kept = await run({ shadows: true, graph, meshShape: [1, 1], pokeAt: 3 })
    expectSame(kept, cast)
  })
})

const runLora = (shadows: boolean, graph: boolean) =>
  runCpu(
    1,
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh([1, 1])
      const { model, params } = yield* loadModelHub(LlamaForCausalLM, "llama", rules, m, { dtype: "float64" })
      model.computeDtype = "float32"
      const lora = yield* initLora(
        engine,
        m,
        model.parameterShapes,
        rules,
        { rules: defaultLoraRules(4), alpha: 8 },
        3,
      )
      const opt = chain(clipByGlobalNorm(1), adamw({ lr: 1e-2 }))
      const st = yield* initializeOptState(opt, lora, rules, m)
      const step = makeLoraTrainStep(model, opt, params, 8, { graph, shadows })
      const ops = countOps(engine.backend)
      const host = makeBatch(model.config.vocabSize)
      const losses: number[] = []
      const castsPerStep: number[] = []
      try {
        for (let s = 0; s < STEPS; s++) {
          const ids = host.inputIds.map((t, i) => (t === 0 ? 0 : 3 + ((t + 5 * s + i) % 200)))
          const { batch } = yield* placeBatch(engine, m, { ...host, inputIds: ids })
          ops.reset()
          const out = yield* step(lora, st, batch)
          castsPerStep.push(ops.count("cast"))
          losses.push(Number(shardToHost(out.loss, 0)[0]))
          out.loss.dispose()
        }
      } finally {
        ops.restore()
      }
      const result = {
        losses,
        castsPerStep,
        base: Object.keys(params).length,
        lora: Object.entries(lora).map(([k, a]) => [k, Array.from(toHost(a) as Float32Array)] as const),
      }
      step.dispose()
      return result
    }),
  )

describe("LoRA: the frozen base's shadows", () => {
  it.each([false, true])(
    "graph %s: adapters bit for bit as casting every step, the base cast once",
    async (graph) => {
      const cast = await runLora(false, graph)
      const kept = await runLora(true, graph)
      expect(kept.losses).toEqual(cast.losses)
      expect(new Set(kept.losses).size).toBe(STEPS)
      for (const [i, [name, a]] of cast.lora.entries()) expect(kept.lora[i]![1], name).toEqual(a)
      expect(kept.castsPerStep[0]).toBe(cast.castsPerStep[0])
      expect(cast.castsPerStep[1]! - kept.castsPerStep[1]!).toBeGreaterThanOrEqual(kept.base)
    },
  )
})
