/**
 * Fuzzing checkpoints: a saved step whose manifest, Zarr metadata or chunks are mutated (bytes,
 * JSON structure, truncation, growth) restores or fails with a typed checkpoint error: never a
 * defect, a hang or a native copy outside a buffer (run under the ASan addon for the last).
 */
import { cpSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs"
import { join, relative } from "node:path"
import { Effect } from "effect"
import fc from "fast-check"
import { beforeAll, describe, it } from "vitest"
import { type DType, toBFloat16 } from "../../src/core/dtype.ts"
import { fromHost, type ShardedArray } from "../../src/core/shardedArray.ts"
import { NamedSharding, P, type PartitionSpec } from "../../src/core/sharding.ts"
import { parseArrayMetadata } from "../../src/core/zarr.ts"
import { type ArrayTarget, Checkpointer } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"
import { mesh } from "../helpers.ts"
import { count, fuzzParams, fuzzWorkspace, mutatedBytes, mutatedJsonText, settle } from "./fuzz.ts"

const { dir: base, runtime } = fuzzWorkspace("magix-fuzz-ckpt-", () => CpuRuntime({ devices: 2 }))

const restoreTags = [
  "CheckpointNotFound",
  "CheckpointCorrupt",
  "CheckpointMismatch",
  "UnsafeCheckpointPath",
  "DeviceOutOfMemory",
]
const STEP = 5
const m = mesh([2], ["data"])

/** The arrays saved: row blocks, a column split (non-contiguous chunks), bf16, a scalar, an empty one. */
const arrays: ReadonlyArray<{
  name: string
  shape: number[]
  dtype: DType
  spec: PartitionSpec
  data: () => ArrayBufferView
}> = [
  {
    name: "w",
    shape: [4, 6],
    dtype: "float32",
    spec: P("data"),
    data: () => Float32Array.from({ length: 24 }, (_, i) => i - 3.5),
  },
  {
    name: "cols",
    shape: [3, 4],
    dtype: "float32",
    spec: P(null, "data"),
    data: () => Float32Array.from({ length: 12 }, (_, i) => i * 2),
  },
  {
    name: "half",
    shape: [6],
    dtype: "bfloat16",
    spec: P(),
    data: () => Uint16Array.from({ length: 6 }, (_, i) => toBFloat16(i / 4)),
  },
  { name: "count", shape: [], dtype: "int32", spec: P(), data: () => Int32Array.of(7) },
  { name: "none", shape: [0, 4], dtype: "float32", spec: P(), data: () => new Float32Array(0) },
]
/** What a restore asks for: the saved arrays under another sharding too, so chunks are cut and reassembled. */
const targets = (resharded: boolean): Record<string, ArrayTarget> =>
  Object.fromEntries(
    arrays.map((a) => [
      a.name,
      {
        shape: a.shape,
        dtype: a.dtype,
        sharding: new NamedSharding(
          m,
          resharded && a.shape.length === 2 && a.shape[1]! % 2 === 0 ? P(null, "data") : a.spec,
        ),
      },
    ]),
  )

const pristine = join(base, "pristine")
let files: string[] = []

beforeAll(async () => {
  await runtime.runPromise(
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const ckpt = yield* Checkpointer
      const params: Record<string, ShardedArray> = {}
      for (const a of arrays)
        params[a.name] = yield* fromHost(engine, a.data(), a.shape, a.dtype, new NamedSharding(m, a.spec))
      yield* ckpt.save(STEP, { params }, { dataPosition: { step: STEP }, rng: { seed: 1 } })
      yield* ckpt.wait
    }).pipe(Effect.provide(Checkpointer.layer({ directory: pristine })), Effect.scoped),
  )
  const walk = (dir: string): string[] =>
    readdirSync(dir).flatMap((e) => {
      const p = join(dir, e)
      return statSync(p).isDirectory() ? walk(p) : [relative(pristine, p)]
    })
  files = walk(join(pristine, String(STEP))).map((f) => f)
})

let n = 0
/** A fresh copy of the saved checkpoint with `file` replaced by `bytes` (or removed). */
const copyWith = (file: string, bytes: Uint8Array | undefined) => {
  const root = join(base, `c${n++}`)
  cpSync(pristine, root, { recursive: true })
  if (bytes === undefined) rmSync(join(root, file))
  else writeFileSync(join(root, file), bytes)
  return root
}

const restoreFrom = (root: string, resharded: boolean) =>
  Effect.gen(function* () {
    const ckpt = yield* Checkpointer
    yield* ckpt.readManifest(STEP)
    const out = yield* ckpt.restore(STEP, { params: targets(resharded) })
    for (const a of Object.values(out.params)) a.dispose()
  }).pipe(Effect.provide(Checkpointer.layer({ directory: root })), Effect.scoped)

type Mutation = { readonly file: string; readonly bytes: Uint8Array | undefined }

const mutation: fc.Arbitrary<Mutation> = fc.constant(null).chain(() =>
  fc
    .oneof(
      fc.constantFrom(...files.filter((f) => f.endsWith("manifest.json"))),
      fc.constantFrom(...files.filter((f) => f.endsWith("zarr.json"))),
      fc.constantFrom(...files.filter((f) => !f.endsWith(".json"))),
    )
    .chain((file) => {
      const seed = new Uint8Array(readFileSync(join(pristine, file)))
      const json = file.endsWith(".json")
      const text = Buffer.from(seed).toString("utf8")
      const enc = (s: string) => new TextEncoder().encode(s)
      return fc
        .oneof(
          { weight: json ? 3 : 0, arbitrary: json ? mutatedJsonText(text).map(enc) : fc.constant(seed) },
          { weight: 2, arbitrary: mutatedBytes(seed) },
          { weight: 1, arbitrary: fc.constant(undefined) },
        )
        .map((bytes) => ({ file, bytes }))
    }),
)

describe("checkpoint restore", () => {
  it("a mutated manifest, zarr.json or chunk restores or fails with a typed error", async () => {
    await fc.assert(
      fc.asyncProperty(mutation, fc.boolean(), async ({ file, bytes }, resharded) => {
        count(
          file.endsWith("manifest.json")
            ? "checkpoint manifest"
            : file.endsWith("zarr.json")
              ? "zarr metadata"
              : "zarr chunk",
        )
        const root = copyWith(file, bytes)
        try {
          await settle(restoreFrom(root, resharded), restoreTags, {
            run: (e) => runtime.runPromiseExit(e),
            timeoutMs: 10_000,
          })
        } finally {
          rmSync(root, { recursive: true, force: true })
        }
      }),
      fuzzParams(150),
    )
  })

  it("parseArrayMetadata: mutated array metadata", async () => {
    const meta = files.find((f) => f.endsWith("w/zarr.json"))!
    const text = readFileSync(join(pristine, meta), "utf8")
    await fc.assert(
      fc.asyncProperty(mutatedJsonText(text), async (t) => {
        count("zarr metadata")
        let json: unknown
        try {
          json = JSON.parse(t)
        } catch {
          return
        }
        await settle(parseArrayMetadata(json, "zarr.json"), ["InvalidZarrMetadata"])
      }),
      fuzzParams(400),
    )
  })
})

describe("checkpoint regressions", () => {
  it("a chunk_shape far larger than the array is a typed error, not an allocation of terabytes", async () => {
    for (const chunk of [
      [2 ** 40, 6],
      [2 ** 26, 2 ** 26],
      [4, 2 ** 50],
    ]) {
      const meta = files.find((f) => f.endsWith("params/w/zarr.json"))!
      const json = JSON.parse(readFileSync(join(pristine, meta), "utf8"))
      json.chunk_grid.configuration.chunk_shape = chunk
      const root = copyWith(meta, new TextEncoder().encode(JSON.stringify(json)))
      await settle(restoreFrom(root, false), restoreTags, { run: (e) => runtime.runPromiseExit(e) })
    }
  })
})
