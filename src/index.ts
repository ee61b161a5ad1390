/**
 * Magix for TypeScript: the public API.
 *
 *   import * as Magix from "magix"
 *   const mesh = yield* Magix.createDeviceMesh([2, 2], ["data", "model"])
 *   const { model, params } = yield* Magix.loadModelHub(LlamaForCausalLM, "meta-llama/Llama-3.2-1B", LlamaForCausalLM.partitionRules, mesh)
 */
export { valueAndGrad } from "./core/autodiff.ts"
export type { DType } from "./core/dtype.ts"
export * from "./core/errors.ts"
export { type GenerateOptions, generate, type PromptBatch } from "./core/generate.ts"
export { type JitOptions, jit } from "./core/jit.ts"
export { Mesh } from "./core/mesh.ts"
export { type HostTokenBatch, placeBatch } from "./core/models/batch.ts"
export type { Params, TokenBatch } from "./core/models/decoder.ts"
export { initParams } from "./core/models/init.ts"
export * as optim from "./core/optim.ts"
export { initializeOptState } from "./core/optim.ts"
export { duplicateOver, type PartitionRules, specFor, treeShardings } from "./core/partitionRules.ts"
export {
  fromHost,
  itemSharding,
  makeArrayFromCallback,
  makeArrayFromSlices,
  reshard,
  ShardedArray,
  toHost,
} from "./core/shardedArray.ts"
export { NamedSharding, P, PartitionSpec } from "./core/sharding.ts"
export { makeTrainStep, trainStepFn } from "./core/train.ts"
export { CpuRuntime, CudaRuntime, createDeviceMesh, DefaultRuntime, Devices } from "./layers/Devices.ts"
export { Hub } from "./layers/Hub.ts"
export { loadModelHub } from "./layers/loadModel.ts"
