/**
 * LoRA adapters in PEFT's layout, so `peft` loads what `magix train --lora` writes and
 * `magix generate --lora` reads adapters PEFT wrote: adapter_config.json (r, lora_alpha,
 * target_modules) and adapter_model.safetensors with keys
 * `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].
 */
import { readFile, rename, rm, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { Effect, Schema } from "effect"
import { convertHost } from "../core/dtype.ts"
import type { LoraParams } from "../core/lora.ts"
import { loraSpecs } from "../core/lora.ts"
import type { Mesh } from "../core/mesh.ts"
import { type PartitionRules, specFor } from "../core/partitionRules.ts"
import { makeArrayFromSlices, type ShardedArray, toHost } from "../core/shardedArray.ts"
import { NamedSharding } from "../core/sharding.ts"
import { Devices } from "./Devices.ts"
import { makeDirectories } from "./makeDirectories.ts"
import { openSafetensors, writeSafetensors } from "./SafetensorsFile.ts"

export class LoraAdapterInvalid extends Schema.TaggedError<LoraAdapterInvalid>()("LoraAdapterInvalid", {
  directory: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `${this.directory} is not a LoRA adapter this model can use: ${this.detail}`
  }
}

const AdapterConfig = Schema.Struct({
  peft_type: Schema.optional(Schema.String),
  r: Schema.Number,
  lora_alpha: Schema.Number,
})

const peftKey = (pair: string) => {
  const m = /^(.*)\.weight\.lora_([AB])$/.exec(pair)
  if (!m) throw new Error(`not a LoRA pair name: ${pair}`)
  return `base_model.model.${m[1]}.lora_${m[2]}.weight`
}
const fromPeftKey = (key: string) => {
  const m = /^base_model\.model\.(.*)\.lora_([AB])(?:\.default)?\.weight$/.exec(key)
  return m ? `${m[1]}.weight.lora_${m[2]}` : undefined
}

/** Writes the adapter to `directory` (replaced atomically when it exists). */
export const saveLoraAdapter = (lora: LoraParams, alpha: number, directory: string, baseModel: string) =>
  Effect.gen(function* () {
    const names = Object.keys(lora)
    const rank = lora[names[0]!]?.shape[0] ?? 0
    const modules = [...new Set(names.map((n) => /\.([a-z_]+)\.weight\.lora_[AB]$/.exec(n)?.[1] ?? n))].sort()
    const tmp = `${directory}.tmp-${process.pid}`
    const io = (e: unknown) =>
      new LoraAdapterInvalid({ directory, detail: e instanceof Error ? e.message : String(e) })
    yield* Effect.tryPromise({ try: () => makeDirectories(tmp), catch: io })
    yield* writeSafetensors(
      join(tmp, "adapter_model.safetensors"),
      names.map((n) => ({
        name: peftKey(n),
        dtype: "float32" as const,
        shape: lora[n]!.shape,
        data: toHost(lora[n]!),
      })),
      { format: "pt" },
    ).pipe(Effect.mapError(io))
    const config = {
      peft_type: "LORA",
      task_type: "CAUSAL_LM",
      r: rank,
      lora_alpha: alpha,
      lora_dropout: 0,
      bias: "none",
      fan_in_fan_out: false,
      inference_mode: true,
      target_modules: modules,
      base_model_name_or_path: baseModel,
    }
    yield* Effect.tryPromise({
      try: async () => {
        await writeFile(join(tmp, "adapter_config.json"), JSON.stringify(config, null, 2))
        await rm(directory, { recursive: true, force: true })
        await rename(tmp, directory)
      },
      catch: io,
    })
    return directory
  })

/** Reads an adapter onto the mesh, each pair sharded after its base weight. */
export const loadLoraAdapter = (directory: string, mesh: Mesh, rules: PartitionRules) =>
  Effect.gen(function* () {
    const { engine } = yield* Devices
    const invalid = (detail: string) => new LoraAdapterInvalid({ directory, detail })
    const text = yield* Effect.tryPromise({
      try: () => readFile(join(directory, "adapter_config.json"), "utf8"),
      catch: () => invalid("adapter_config.json is missing"),
    })
    const config = yield* Schema.decodeUnknownEffect(AdapterConfig)(JSON.parse(text)).pipe(
      Effect.mapError(() => invalid("adapter_config.json lacks r or lora_alpha")),
    )
    if (config.peft_type !== undefined && config.peft_type !== "LORA")
      return yield* invalid(`peft_type ${config.peft_type} (only LORA is supported)`)
    const params: Record<string, ShardedArray> = {}
    yield* Effect.scoped(
      Effect.gen(function* () {
        const file = yield* openSafetensors(join(directory, "adapter_model.safetensors"))
        for (const key of file.names) {
          const name = fromPeftKey(key)
          if (!name) return yield* invalid(`unexpected tensor ${key}`)
          const entry = yield* file.entry(key)
          const base = name.replace(/\.lora_[AB]$/, "")
          const specs = loraSpecs(specFor(rules, base, [1, 1]))
          const spec = name.endsWith("lora_A") ? specs.a : specs.b
          params[name] = yield* makeArrayFromSlices(
            engine,
            entry.shape,
            "float32",
            new NamedSharding(mesh, spec),
            (slice) => Effect.map(file.readSlice(key, slice), (b) => convertHost(b, entry.dtype, "float32")),
            name,
          )
        }
      }),
    ).pipe(Effect.mapError((e) => (e instanceof LoraAdapterInvalid ? e : invalid(e.message))))
    return { params: params as LoraParams, alpha: config.lora_alpha, rank: config.r }
  })
