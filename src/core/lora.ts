/**
 * LoRA (Magix's lora.py in the Hugging Face [out, in] layout, PEFT's names): for each weight W
 * [out, in] a rank rule matches, A [r, in] (Kaiming-uniform) and B [out, r] (zeros), and the
 * effective weight W + (alpha / r)·B·A. A keeps W's input split and B its output split, so the
 * low-rank path follows W's sharding; the base weights stay frozen.
 */
import { Effect } from "effect"
import { dtypeCode, hostArray } from "./dtype.ts"
import type { Engine } from "./engine.ts"
import type { Mesh } from "./mesh.ts"
import { forEachGlobalIndex } from "./models/init.ts"
import { type PartitionRules, specFor } from "./partitionRules.ts"
import { streamKey, uniformAt } from "./random.ts"
import { numel } from "./shape.ts"
import { makeArrayFromCallback, type ShardedArray } from "./shardedArray.ts"
import { NamedSharding, PartitionSpec } from "./sharding.ts"

/** [regex over parameter paths, rank]: the first matching rule gives a weight its rank. */
export type LoraRules = ReadonlyArray<readonly [string | RegExp, number]>

/** Magix's default: every projection matrix of every layer. */
export const defaultLoraRules = (rank: number): LoraRules => [["layers\\.\\d+\\..*_proj\\.weight$", rank]]

export interface LoraConfig {
  readonly rules: LoraRules
  readonly alpha: number
}

/** LoRA parameters by name: `<weight>.lora_A`, `<weight>.lora_B`. */
export type LoraParams = Readonly<Record<string, ShardedArray>>

export const loraRank = (rules: LoraRules, path: string): number | undefined => {
  for (const [pattern, rank] of rules)
    if ((typeof pattern === "string" ? new RegExp(pattern) : pattern).test(path)) return rank
  return undefined
}

/** The specs of a weight's pair: A without the output axes, B without the input axes. */
export const loraSpecs = (weightSpec: PartitionSpec): { a: PartitionSpec; b: PartitionSpec } => {
  const [o, i] = weightSpec.padTo(2).entries as [ReadonlyArray<string>, ReadonlyArray<string>]
  return { a: new PartitionSpec([[], i]), b: new PartitionSpec([o, []]) }
}

/** Fresh LoRA pairs for every 2-D parameter a rule matches, sharded after their weight. */
export const initLora = (
  engine: Engine,
  mesh: Mesh,
  shapes: ReadonlyArray<readonly [string, ReadonlyArray<number>]>,
  partitionRules: PartitionRules,
  lora: LoraConfig,
  seed: number,
) =>
  Effect.gen(function* () {
    const out: Record<string, ShardedArray> = {}
    let k = 0
    for (const [name, shape] of shapes) {
      const r = loraRank(lora.rules, name)
      if (r === undefined || shape.length !== 2) continue
      const [outDim, inDim] = shape as [number, number]
      const specs = loraSpecs(specFor(partitionRules, name, shape))
      const key = streamKey(seed, 0x10a + k++)
      // Kaiming-uniform with a = √5 (PEFT and torch.nn.Linear): bound = 1/√in.
      const bound = 1 / Math.sqrt(inDim)
      out[`${name}.lora_A`] = yield* makeArrayFromCallback(
        engine,
        [r, inDim],
        "float32",
        new NamedSharding(mesh, specs.a),
        (slice) => {
          const a = hostArray("float32", numel(slice.shape)) as Float32Array
          forEachGlobalIndex([r, inDim], slice, (l, g) => (a[l] = (2 * uniformAt(key, g) - 1) * bound))
          return a
        },
        `${name}.lora_A`,
      )
      out[`${name}.lora_B`] = yield* makeArrayFromCallback(
        engine,
        [outDim, r],
        "float32",
        new NamedSharding(mesh, specs.b),
        (slice) => new Float32Array(numel(slice.shape)),
        `${name}.lora_B`,
      )
    }
    return out as LoraParams
  })

/** Partition rules for LoRA pairs derived from the model's rules (for optimizer state and restore). */
export const loraPartitionRules = (
  partitionRules: PartitionRules,
  names: ReadonlyArray<string>,
): PartitionRules =>
  names.flatMap((n) => {
    const base = n.replace(/\.lora_[AB]$/, "")
    const specs = loraSpecs(specFor(partitionRules, base, [1, 1]))
    const escaped = n.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")
    return [[`${escaped}$`, n.endsWith("lora_A") ? specs.a : specs.b] as const]
  })

/**
 * The parameters with every adapted weight replaced by W + (alpha / r)·B·A (for generation with
 * --lora merged). B·A needs no communication: B holds W's output split and A its input split.
 * Returns new arrays for the adapted weights and the same arrays for the others.
 */
export const mergeLora = (
  params: Readonly<Record<string, ShardedArray>>,
  lora: LoraParams,
  alpha: number,
  rules: PartitionRules,
): Record<string, ShardedArray> => {
  const out: Record<string, ShardedArray> = { ...params }
  for (const [name, w] of Object.entries(params)) {
    const a = lora[`${name}.lora_A`]
    const b = lora[`${name}.lora_B`]
    if (!a || !b) continue
    const engine = w.engine
    const target = new NamedSharding(w.mesh, specFor(rules, name, w.shape))
    const base = engine.collectives.relayout(w, target.spec)
    const specs = loraSpecs(target.spec)
    const aa = engine.collectives.relayout(a, specs.a)
    const bb = engine.collectives.relayout(b, specs.b)
    const r = a.shape[0]!
    const [outL, inL] = base.localShape as [number, number]
    for (let p = 0; p < w.mesh.size; p++) {
      // base = base + (alpha / r)·B·A, one matmul per device with beta = 1.
      engine.backend.exec(
        "matmul",
        [bb.buffer(p), aa.buffer(p), base.buffer(p)],
        [dtypeCode(w.dtype), 1, outL, inL, r, 0, 0, alpha / r, 1, r, inL, inL, 0, 0, 0, 0, 0, 0],
      )
    }
    aa.dispose()
    bb.dispose()
    out[name] = base
  }
  return out
}
