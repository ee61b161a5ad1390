/**
 * Fresh parameters for training from scratch, as transformers initialises them: weights normal
 * with std `initializerRange` (0.02), norm weights 1 (0 for Gemma's 1 + w). Each device generates
 * only its own block, and every sharding yields the same values (counter-based random numbers).
 */
import { Effect } from "effect"
import { type DType, dtypeCode } from "../dtype.ts"
import type { Engine } from "../engine.ts"
import type { Mesh } from "../mesh.ts"
import { fillArray } from "../ops/elementwise.ts"
import { type PartitionRules, specFor } from "../partitionRules.ts"
import { streamKey } from "../random.ts"
import { numel, strides } from "../shape.ts"
import { allocateArray, type ShardedArray } from "../shardedArray.ts"
import { NamedSharding, type Slice } from "../sharding.ts"
import type { CausalLM, Params } from "./decoder.ts"

export interface InitOptions {
  readonly seed: number
  readonly dtype?: DType
  readonly initializerRange?: number
}

/** Calls f with the global flat index of every element of a block, in row-major block order. */
export const forEachGlobalIndex = (
  shape: ReadonlyArray<number>,
  slice: Slice,
  f: (local: number, global: number) => void,
) => {
  const st = strides(shape)
  const n = numel(slice.shape)
  const rank = shape.length
  const idx = new Array<number>(rank).fill(0)
  for (let local = 0; local < n; local++) {
    let g = 0
    for (let d = 0; d < rank; d++) g += (slice.offsets[d]! + idx[d]!) * st[d]!
    f(local, g)
    for (let d = rank - 1; d >= 0; d--) {
      if (++idx[d]! < slice.shape[d]!) break
      idx[d] = 0
    }
  }
}

export const initParams = (
  model: CausalLM,
  engine: Engine,
  mesh: Mesh,
  rules: PartitionRules,
  options: InitOptions,
) =>
  Effect.gen(function* () {
    yield* model.checkSharding(rules, mesh)
    const dtype = options.dtype ?? "float32"
    if (dtype !== "float32" && dtype !== "float64")
      return yield* Effect.die(new Error("initParams: float32 or float64"))
    const std = options.initializerRange ?? 0.02
    const normValue = model.modelType === "gemma" ? 0 : 1
    const params: Record<string, ShardedArray> = {}
    const shapes = model.parameterShapes
    try {
      for (let k = 0; k < shapes.length; k++) {
        const [name, shape] = shapes[k]!
        const sharding = new NamedSharding(mesh, specFor(rules, name, shape))
        yield* sharding.validate(shape, name)
        if (name.endsWith("norm.weight")) {
          params[name] = fillArray(engine, shape, dtype, sharding, normValue)
          continue
        }
        // Each device draws its own block on the device: the same numbers as normalAt.
        const arr = allocateArray(engine, shape, dtype, sharding)
        params[name] = arr
        const key = streamKey(options.seed, k)
        for (let p = 0; p < mesh.size; p++) {
          const slice = sharding.slice(p, shape)
          engine.backend.exec(
            "random_normal",
            [arr.buffer(p)],
            [dtypeCode(dtype), key, std, shape.length, ...shape, ...slice.offsets, ...slice.shape],
          )
        }
      }
    } catch (e) {
      for (const a of Object.values(params)) a.dispose()
      throw e
    }
    return params as Params
  })
