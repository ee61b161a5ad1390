/**
 * In-place cotangent accumulation (autodiff's AccumulationTarget): where an array feeds several
 * ops, the linear and rmsnorm backward kernels add their contribution into the cotangent already
 * accumulated (matmul beta = 1, rmsnorm_bwd accumulateDx) instead of autodiff issuing an `add`.
 * Gradients must match those with every contribution added separately, on one device and sharded
 * (where dx is a partial sum), with and without activation checkpointing; and the backward pass of
 * a decoder layer must need no `add` at all.
 */
import { Effect } from "effect"
import { afterEach, describe, expect, it } from "vitest"
import { setAccumulateInPlace, valueAndGrad } from "../../src/core/autodiff.ts"
import type { Engine } from "../../src/core/engine.ts"
import type { Mesh } from "../../src/core/mesh.ts"
import { placeBatch } from "../../src/core/models/batch.ts"
import { LlamaForCausalLM, type Params } from "../../src/core/models/decoder.ts"
import { add, weightedSum } from "../../src/core/ops/elementwise.ts"
import { glu } from "../../src/core/ops/glu.ts"
import { linear } from "../../src/core/ops/linear.ts"
import { rmsnorm } from "../../src/core/ops/rmsnorm.ts"
import { remat } from "../../src/core/remat.ts"
import { fromHost, type ShardedArray, shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P, type PartitionSpec } from "../../src/core/sharding.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { countOps, mesh, relErr, runCpu, withEngine } from "../helpers.ts"
import { makeBatch } from "../parallel/equivalenceRun.ts"

afterEach(() => {
  setAccumulateInPlace(true)
})

/** Runs f with every op the engine executes counted by name. */
const counted = <A>(engine: Engine, f: () => A) => {
  const ops = countOps(engine.backend)
  try {
    return { result: f(), ops }
  } finally {
    ops.restore()
  }
}

let seed = 11
const rand = () => {
  seed = (Math.imul(seed, 1103515245) + 12345) >>> 0
  return seed / 2 ** 32 - 0.5
}

const [B, T, D, F] = [2, 3, 8, 12]
const shapes: Record<string, number[]> = {
  x: [B, T, D],
  n1: [D],
  q: [D, D],
  k: [D, D],
  v: [D, D],
  o: [D, D],
  n2: [D],
  g: [F, D],
  u: [F, D],
  d: [D, F],
  W: [B, T, D],
}
const values = Object.fromEntries(
  Object.entries(shapes).map(([k, s]) => [k, Float64Array.from({ length: s.reduce((a, b) => a * b) }, rand)]),
)
// Megatron-style: column-parallel q/k/v/gate/up, row-parallel o/down, the batch over data.
const tensorParallel: Record<string, PartitionSpec> = {
  x: P("data"),
  q: P("model"),
  k: P("model"),
  v: P("model"),
  o: P(null, "model"),
  g: P("model"),
  u: P("model"),
  d: P(null, "model"),
  W: P("data"),
}

/** One decoder-like layer: a normed input read by three linears, a residual stream read by two norms. */
const layer = (p: Record<string, ShardedArray>, h: ShardedArray): ShardedArray => {
  const a = rmsnorm(h, p.n1!, 1e-5)
  const attn = add(linear(a, p.q!), add(linear(a, p.k!), linear(a, p.v!)))
  const r = add(h, linear(attn, p.o!))
  const m = rmsnorm(r, p.n2!, 1e-5)
  return add(r, linear(glu(linear(m, p.g!), linear(m, p.u!), "silu"), p.d!))
}

const layerGrads = (devices: [number, number], inPlace: boolean, checkpoint: boolean) => {
  let out: { grads: Record<string, Float64Array>; adds: number; forwardAdds: number } | undefined
  return withEngine(devices[0] * devices[1], (engine) => {
    const m: Mesh = mesh(devices)
    const place = (k: string) =>
      Effect.runSync(
        fromHost(
          engine,
          values[k]!,
          shapes[k]!,
          "float64",
          new NamedSharding(m, tensorParallel[k] ?? P()),
          k,
        ),
      )
    const params = Object.fromEntries(Object.keys(shapes).map((k) => [k, place(k)]))
    const { W, ...differentiated } = params
    const loss = (p: Record<string, ShardedArray>) => {
      const ws = Object.values(p).filter((v) => v !== p.x)
      const y = checkpoint ? remat([p.x!, ...ws], () => layer(p, p.x!)) : layer(p, p.x!)
      return weightedSum(y, W!)
    }
    setAccumulateInPlace(inPlace)
    const forward = counted(engine, () => engine.tidy(() => void loss(differentiated)))
    const { result, ops } = counted(engine, () =>
      engine.tidy(() => {
        const { grads } = valueAndGrad(loss)(differentiated)
        return Object.fromEntries(Object.entries(grads).map(([k, g]) => [k, toHost(g) as Float64Array]))
      }),
    )
    out = { grads: result, adds: ops.count("add"), forwardAdds: forward.ops.count("add") }
  }).then(() => out!)
}

describe("in-place cotangent accumulation", () => {
  it.each([
    [[1, 1], false],
    [[2, 2], false],
    [[1, 1], true],
    [[2, 2], true],
  ] as Array<[[number, number], boolean]>)(
    "gives the gradients of separate adds, without the adds (mesh %j, remat %s)",
    async (devices, checkpoint) => {
      const separate = await layerGrads(devices, false, checkpoint)
      const inPlace = await layerGrads(devices, true, checkpoint)
      const reference = await layerGrads([1, 1], false, false)
      for (const [k, g] of Object.entries(separate.grads)) {
        expect(relErr(inPlace.grads[k]!, g), k).toBeLessThan(1e-13)
        expect(relErr(inPlace.grads[k]!, reference.grads[k]!), k).toBeLessThan(1e-12)
      }
      // a feeds q, k and v (2 adds), m feeds gate and up (1), h and r each feed a norm and a
      // residual add (2): five accumulations, none left as an add (one exec per device).
      expect(separate.adds - inPlace.adds).toBe(5 * devices[0] * devices[1])
      // What remains is the forward pass's adds (run twice under remat).
      expect(inPlace.adds).toBe(inPlace.forwardAdds * (checkpoint ? 2 : 1))
    },
  )
})

describe("Llama fixture", () => {
  const run = (inPlace: boolean) =>
    runCpu(
      1,
      Effect.gen(function* () {
        const { engine } = yield* Devices
        const m = mesh([1, 1])
        const { model, params } = yield* loadModelHub(
          LlamaForCausalLM,
          "llama",
          LlamaForCausalLM.partitionRules,
          m,
        )
        const { batch } = yield* placeBatch(engine, m, makeBatch(model.config.vocabSize))
        setAccumulateInPlace(inPlace)
        const forward = counted(engine, () => engine.tidy(() => shardToHost(model.loss(params, batch), 0)[0]))
        const { result, ops } = counted(engine, () =>
          engine.tidy(() => {
            const { value, grads } = valueAndGrad((p: Params) => model.loss(p, batch))(params)
            return {
              loss: Number(shardToHost(value, 0)[0]),
              grads: Object.fromEntries(
                Object.entries(grads).map(([k, g]) => [k, toHost(g) as Float32Array]),
              ),
            }
          }),
        )
        return {
          ...result,
          layers: model.config.numHiddenLayers,
          backwardAdds: ops.count("add") - forward.ops.count("add"),
        }
      }),
    )

  it("needs no add in the backward pass of a layer, with the same gradients", async () => {
    const separate = await run(false)
    const inPlace = await run(true)
    expect(inPlace.loss).toBe(separate.loss)
    for (const [k, g] of Object.entries(separate.grads))
      expect(relErr(inPlace.grads[k]!, g), k).toBeLessThan(1e-5)
    expect(separate.backwardAdds).toBe(5 * separate.layers)
    expect(inPlace.backwardAdds).toBe(0)
  })
})
