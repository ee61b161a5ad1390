/**
 * Export to the Hugging Face layout transformers loads: config.json plus model.safetensors, or
 * model-0000i-of-0000n.safetensors with model.safetensors.index.json above a shard size, in
 * float32 or bfloat16; the tokenizer's files are copied alongside when given. One parameter is
 * gathered to the host at a time, so host memory is bounded by the largest parameter plus a shard.
 */
import { copyFile, readdir, rename, rm, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { Effect, Schema } from "effect"
import { configToJson } from "../core/config.ts"
import { convertHost, type DType, itemSize } from "../core/dtype.ts"
import type { CausalLM, Params } from "../core/models/decoder.ts"
import { makeIndex } from "../core/safetensors.ts"
import { numel } from "../core/shape.ts"
import { toHost } from "../core/shardedArray.ts"
import { makeDirectories } from "./makeDirectories.ts"
import { type TensorData, writeSafetensors } from "./SafetensorsFile.ts"

export class ExportFailed extends Schema.TaggedError<ExportFailed>()("ExportFailed", {
  directory: Schema.String,
  detail: Schema.String,
}) {
  override get message() {
    return `could not write the model to ${this.directory}: ${this.detail}`
  }
}

export interface ExportOptions {
  readonly dtype?: "float32" | "bfloat16"
  /** Split into several files once one would exceed this many bytes (transformers' default 5 GB). */
  readonly maxShardBytes?: number
  /** A directory whose tokenizer files (tokenizer.json, tokenizer_config.json, ...) are copied. */
  readonly tokenizerDir?: string
}

const tokenizerFiles = [
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "chat_template.jinja",
  "generation_config.json",
]

const io =
  (directory: string) =>
  (e: unknown): ExportFailed =>
    new ExportFailed({ directory, detail: e instanceof Error ? e.message : String(e) })

/** Writes `model` with `params` to `directory` (created; replaced atomically when it exists). */
export const saveHuggingFace = (
  model: CausalLM,
  params: Params,
  directory: string,
  options: ExportOptions = {},
) =>
  Effect.gen(function* () {
    const dtype: DType = options.dtype ?? "float32"
    const maxShard = options.maxShardBytes ?? 5 * 10 ** 9
    const tmp = `${directory}.tmp-${process.pid}-${Date.now()}`
    yield* Effect.tryPromise({ try: () => makeDirectories(tmp), catch: io(directory) })
    const shapes = model.parameterShapes
    // Plan shards by size first, so file names can say how many there are.
    const groups: Array<Array<readonly [string, ReadonlyArray<number>]>> = [[]]
    let size = 0
    for (const entry of shapes) {
      const bytes = numel(entry[1]) * itemSize(dtype)
      if (size > 0 && size + bytes > maxShard) {
        groups.push([])
        size = 0
      }
      groups[groups.length - 1]!.push(entry)
      size += bytes
    }
    const total = shapes.reduce((s, [, shape]) => s + numel(shape) * itemSize(dtype), 0)
    const fileName = (i: number) =>
      groups.length === 1
        ? "model.safetensors"
        : `model-${String(i + 1).padStart(5, "0")}-of-${String(groups.length).padStart(5, "0")}.safetensors`
    const weightMap: Record<string, string> = {}
    for (let i = 0; i < groups.length; i++) {
      const tensors: TensorData[] = []
      for (const [name, shape] of groups[i]!) {
        const p = params[name]
        if (!p) return yield* new ExportFailed({ directory, detail: `no parameter ${name}` })
        tensors.push({ name, dtype, shape, data: convertHost(toHost(p), p.dtype, dtype) })
        weightMap[name] = fileName(i)
      }
      yield* writeSafetensors(join(tmp, fileName(i)), tensors, { format: "pt" }).pipe(
        Effect.mapError(io(directory)),
      )
    }
    if (groups.length > 1)
      yield* Effect.tryPromise({
        try: () =>
          writeFile(
            join(tmp, "model.safetensors.index.json"),
            JSON.stringify(makeIndex(weightMap, total), null, 2),
          ),
        catch: io(directory),
      })
    const config = { ...configToJson(model.config), torch_dtype: dtype, dtype }
    yield* Effect.tryPromise({
      try: () => writeFile(join(tmp, "config.json"), JSON.stringify(config, null, 2)),
      catch: io(directory),
    })
    if (options.tokenizerDir) {
      const from = options.tokenizerDir
      const present = yield* Effect.tryPromise({ try: () => readdir(from), catch: io(directory) })
      for (const f of tokenizerFiles.filter((f) => present.includes(f)))
        yield* Effect.tryPromise({ try: () => copyFile(join(from, f), join(tmp, f)), catch: io(directory) })
    }
    yield* Effect.tryPromise({
      try: async () => {
        await rm(directory, { recursive: true, force: true })
        await rename(tmp, directory)
      },
      catch: io(directory),
    })
    return directory
  }).pipe(
    Effect.onError(() =>
      Effect.promise(() =>
        readdir(join(directory, "..")).then(
          (names) =>
            Promise.all(
              names
                .filter((n) => n.startsWith(`${directory.split("/").pop()}.tmp-`))
                .map((n) => rm(join(directory, "..", n), { recursive: true, force: true })),
            ),
          () => undefined,
        ),
      ),
    ),
  )
