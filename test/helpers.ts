/** Shared test helpers: layers for a CPU mesh with the fixture Hub, references, error norms. */
import { join } from "node:path"
import { Effect, Layer, type Scope } from "effect"
import type { Backend } from "../src/core/backend.ts"
import type { Engine } from "../src/core/engine.ts"
import { makeMesh } from "../src/core/mesh.ts"
import type { HostTokenBatch } from "../src/core/models/batch.ts"
import { CpuRuntime, Devices } from "../src/layers/Devices.ts"
import { Hub } from "../src/layers/Hub.ts"
import { openSafetensors } from "../src/layers/SafetensorsFile.ts"

export const fixtures = join(import.meta.dirname, "fixtures")
export const families = ["llama", "llama3", "mistral", "gemma"] as const
export type Family = (typeof families)[number]

/** Runs an effect on `devices` CPU devices with the fixture models as the Hub. */
export const runCpu = <A, E>(
  devices: number,
  effect: Effect.Effect<A, E, Devices | Hub | Scope.Scope>,
): Promise<A> =>
  Effect.runPromise(
    effect.pipe(
      Effect.scoped,
      Effect.provide(Layer.mergeAll(CpuRuntime({ devices }), Hub.localDirectory(join(fixtures, "hf")))),
    ),
  )

/**
 * Counts by name the ops `backend.exec` runs (on the CPU also every jit replay and graph launch)
 * from now until `restore`.
 */
export const countOps = (backend: Backend) => {
  const counts = new Map<string, number>()
  const target = backend as Backend & { exec: Backend["exec"] }
  const exec = target.exec.bind(backend)
  target.exec = (op, buffers, args) => {
    counts.set(op, (counts.get(op) ?? 0) + 1)
    exec(op, buffers, args)
  }
  return {
    count: (op: string) => counts.get(op) ?? 0,
    reset: () => counts.clear(),
    restore: () => {
      target.exec = exec
    },
  }
}

/** Runs f with the engine of a CPU backend of `devices` devices. */
export const withEngine = (devices: number, f: (engine: Engine) => void) =>
  Effect.runPromise(
    Effect.gen(function* () {
      const { engine } = yield* Devices
      f(engine)
    }).pipe(Effect.provide(CpuRuntime({ devices }))),
  )

export const mesh = (shape: number[], names = ["data", "model"]) =>
  Effect.runSync(
    makeMesh(
      Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => i),
      shape,
      names,
    ),
  )

/** ‖a − b‖ / ‖b‖, NaN-safe (NaN never passes). */
export const relErr = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  if (a.length !== b.length) return Number.POSITIVE_INFINITY
  let num = 0
  let den = 0
  for (let i = 0; i < a.length; i++) {
    const d = Number(a[i]) - Number(b[i])
    num += d * d
    den += Number(b[i]) ** 2
  }
  const r = Math.sqrt(num) / Math.sqrt(den)
  return Number.isNaN(r) ? Number.POSITIVE_INFINITY : r
}

/** Every tensor of a safetensors file as host arrays (int64 as numbers). */
export const readReference = (path: string) =>
  Effect.scoped(
    Effect.gen(function* () {
      const f = yield* openSafetensors(path)
      const out: Record<string, { shape: ReadonlyArray<number>; data: Float64Array }> = {}
      for (const name of f.names) {
        const data = yield* f.readTensor(name)
        const entry = yield* f.entry(name)
        out[name] = {
          shape: entry.shape,
          data: Float64Array.from(data as ArrayLike<number | bigint>, Number),
        }
      }
      return out
    }),
  )

/** The training batch of a family's reference: targets are the labels shifted left by one. */
export const referenceBatch = (
  ref: Record<string, { shape: ReadonlyArray<number>; data: Float64Array }>,
): HostTokenBatch => {
  const [B, T] = ref.input_ids!.shape as [number, number]
  const labels = ref.labels!.data
  const targets = new Int32Array(B * T).fill(-100)
  for (let b = 0; b < B; b++) for (let t = 0; t < T - 1; t++) targets[b * T + t] = labels[b * T + t + 1]!
  return {
    batchSize: B,
    length: T,
    inputIds: Int32Array.from(ref.input_ids!.data),
    positions: Int32Array.from(ref.position_ids!.data),
    targets,
    attentionMask: Uint8Array.from(ref.attention_mask!.data),
  }
}
