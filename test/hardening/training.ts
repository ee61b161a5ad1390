/**
 * Shared by the interruption, numerics and soak tests: the embedded tiny model trained in-process
 * on two CPU devices, and a restore of any checkpoint the way a resume reads it.
 */
import { readdirSync, readFileSync, statSync } from "node:fs"
import { join } from "node:path"
import { Effect, Layer } from "effect"
import { modelClassFor } from "../../src/core/models/decoder.ts"
import { specFor } from "../../src/core/partitionRules.ts"
import { isShardedArray, type ShardedArray, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { leaves, type Tree } from "../../src/core/tree.ts"
import { type ArrayTarget, Checkpointer } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime, createDeviceMesh } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadModelConfig } from "../../src/layers/loadModel.ts"
import { embeddedModelDir, embeddedTrainFile, type TrainOptions } from "../../src/layers/Training.ts"

export const tinyOptions: TrainOptions = {
  modelType: "llama",
  trainFile: embeddedTrainFile,
  split: "train",
  trainDataField: "text",
  useChatTemplate: false,
  maxLength: 16,
  numEpochs: 120,
  batchSize: 32,
  learningRate: 5e-3,
  weightDecay: 1e-4,
  adamBeta1: 0.9,
  adamBeta2: 0.999,
  maxGradNorm: 1,
  meshShape: [2, 1],
  seed: 42,
  packing: false,
  dataWorkers: 0,
  bf16ModelWeights: false,
  gradientCheckpointing: false,
}

/** The layers `magix train --cpu-devices 2` runs on, checkpointing into `directory`. */
export const trainingLayer = (directory: string, saveInterval: number, maxToKeep?: number) =>
  Checkpointer.layer({
    directory,
    saveInterval,
    ...(maxToKeep !== undefined ? { maxToKeep } : {}),
  }).pipe(Layer.provideMerge(Layer.mergeAll(CpuRuntime({ devices: 2 }), Hub.layer)))

/** Every file of one item of a checkpoint step, by relative path (byte-equal means equal values). */
export const checkpointFiles = (root: string, step: number, item = "params"): Record<string, string> => {
  const out: Record<string, string> = {}
  const walk = (dir: string, rel: string) => {
    for (const name of readdirSync(dir).sort()) {
      const path = join(dir, name)
      if (statSync(path).isDirectory()) walk(path, `${rel}${name}/`)
      else out[`${rel}${name}`] = readFileSync(path).toString("base64")
    }
  }
  walk(join(root, String(step), item), "")
  return out
}

/**
 * Restores a step's parameters and optimizer state as runTraining does on resume (checksums
 * checked), and says whether every parameter and moment is finite. Needs the Checkpointer and Devices.
 */
export const restoreStep = (step: number) =>
  Effect.gen(function* () {
    const ckpt = yield* Checkpointer
    const mesh = yield* createDeviceMesh([2, 1])
    const Model = modelClassFor("llama")
    const model = yield* loadModelConfig(Model, embeddedModelDir)
    const targets: Record<string, ArrayTarget> = {}
    for (const [name, shape] of model.parameterShapes)
      targets[name] = {
        shape,
        dtype: "float32",
        sharding: new NamedSharding(mesh, specFor(Model.partitionRules, name, shape)),
      }
    const restored = yield* ckpt.restore(step, {
      params: targets,
      optState: {
        mu: targets,
        nu: targets,
        scalars: { shape: [8], dtype: "float64", sharding: new NamedSharding(mesh, P()) },
      },
    } as Record<string, Tree<ArrayTarget>>)
    const arrays = Object.values(restored).flatMap((t) =>
      leaves(t as never, isShardedArray),
    ) as ShardedArray[]
    // The scalars hold the last gradient norm, NaN after a skipped step: only values are judged.
    const finite = arrays
      .filter((a) => a.dtype === "float32")
      .every((a) => Array.from(toHost(a) as Float32Array).every(Number.isFinite))
    for (const a of arrays) a.dispose()
    return { arrays: arrays.length, finite }
  })
