/**
 * Fuzzing the safetensors readers: the header codec, a whole file opened and read back (every
 * tensor and a block of each), the sharded-checkpoint index and a model directory read through
 * it. Every input gives a result or a typed error.
 */
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { Effect, Layer } from "effect"
import fc from "fast-check"
import { describe, it } from "vitest"
import { LlamaForCausalLM } from "../../src/core/models/decoder.ts"
import { parseHeader, parseIndex, serializeHeader } from "../../src/core/safetensors.ts"
import { CpuRuntime } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { openModelWeights, openSafetensors } from "../../src/layers/SafetensorsFile.ts"
import { fixtures, mesh } from "../helpers.ts"
import { count, fuzzParams, fuzzWorkspace, mutatedBytes, mutatedJsonText, settle } from "./fuzz.ts"

const { dir, runtime } = fuzzWorkspace("magix-fuzz-st-", (d) =>
  Layer.mergeAll(CpuRuntime({ devices: 2 }), Hub.localDirectory(d)),
)

const headerTags = [
  "SafetensorsBadHeaderLength",
  "SafetensorsBadHeader",
  "SafetensorsUnsupportedDType",
  "SafetensorsBadShape",
  "SafetensorsBadOffsets",
  "SafetensorsSizeMismatch",
  "SafetensorsOverlap",
  "SafetensorsBadMetadata",
]
const fileTags = [
  ...headerTags,
  "SafetensorsFileNotFound",
  "SafetensorsIOError",
  "TensorNotFound",
  "SafetensorsSliceOutOfBounds",
]
const indexTags = ["InvalidWeightIndex", "UnsafeIndexPath"]
const weightsTags = [...fileTags, ...indexTags, "ModelWeightsNotFound"]

/** A small file with every shape of entry the reader handles: 2-d, 1-d, a scalar, an empty tensor, 16- and 64-bit. */
const smallFile = (): Uint8Array => {
  const tensors = [
    {
      name: "a.weight",
      dtype: "float32" as const,
      shape: [3, 4],
      data: Float32Array.from({ length: 12 }, (_, i) => i),
    },
    { name: "b", dtype: "bfloat16" as const, shape: [5], data: new Uint16Array(5).fill(0x3f80) },
    { name: "c", dtype: "int64" as const, shape: [2, 2], data: BigInt64Array.from([1n, 2n, 3n, 4n]) },
    { name: "scalar", dtype: "float32" as const, shape: [], data: Float32Array.of(2.5) },
    { name: "empty", dtype: "float32" as const, shape: [0, 3], data: new Float32Array(0) },
  ]
  const { header, offsets, fileSize } = Effect.runSync(
    serializeHeader(
      tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.data.byteLength })),
      { format: "pt" },
    ),
  )
  const out = new Uint8Array(fileSize)
  out.set(header)
  for (const o of offsets) {
    const t = tensors.find((x) => x.name === o.name)!
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), o.begin)
  }
  return out
}

const small = smallFile()
const fixture = new Uint8Array(readFileSync(join(fixtures, "hf", "llama", "model.safetensors")))
const headerEnd = (b: Uint8Array) => 8 + Number(new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, true))
/** The fixture's length and header only: what parseHeader sees, without megabytes of data to copy. */
const fixtureHeader = fixture.subarray(0, headerEnd(fixture))

/** Opens `bytes` as a file and reads every tensor whole and its first half along the first dimension. */
const openAndRead = (path: string) =>
  Effect.scoped(
    Effect.gen(function* () {
      const f = yield* openSafetensors(path)
      for (const name of f.names) {
        const e = yield* f.entry(name)
        yield* f.readTensor(name)
        if (e.shape.length > 0)
          yield* f.readSlice(name, {
            offsets: e.shape.map((d, i) => (i === 0 ? Math.floor(d / 2) : 0)),
            shape: e.shape.map((d, i) => (i === 0 ? d - Math.floor(d / 2) : d)),
          })
      }
      return f.names.length
    }),
  )

let n = 0
const fresh = (name: string) => join(dir, `${n++}-${name}`)

describe("safetensors header", () => {
  it("parseHeader: mutated headers of a small file and of the llama fixture", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(mutatedBytes(small, headerEnd(small)), mutatedBytes(fixtureHeader)),
        fc.boolean(),
        async (bytes, claimWhole) => {
          count("safetensors header")
          // The file size a reader would stat: the bytes given, or more than given (a header cut short).
          const size = claimWhole ? bytes.byteLength : bytes.byteLength + 64
          await settle(parseHeader(bytes, size, "fuzz.safetensors"), headerTags)
        },
      ),
      fuzzParams(400),
    )
  })

  it("parseHeader: random bytes after a plausible length", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ maxLength: 256 }),
        fc.integer({ min: 0, max: 300 }),
        async (body, len) => {
          count("safetensors header")
          const bytes = new Uint8Array(8 + body.byteLength)
          new DataView(bytes.buffer).setBigUint64(0, BigInt(len), true)
          bytes.set(body, 8)
          await settle(parseHeader(bytes, bytes.byteLength, "random.safetensors"), headerTags)
        },
      ),
      fuzzParams(200),
    )
  })

  it("parseHeader: mutated header JSON (structure, not bytes)", async () => {
    const text = Buffer.from(small.subarray(8, headerEnd(small)))
      .toString("utf8")
      .trimEnd()
    await fc.assert(
      fc.asyncProperty(mutatedJsonText(text), async (json) => {
        count("safetensors header")
        const body = new TextEncoder().encode(json)
        const data = small.byteLength - headerEnd(small)
        const bytes = new Uint8Array(8 + body.byteLength + data)
        new DataView(bytes.buffer).setBigUint64(0, BigInt(body.byteLength), true)
        bytes.set(body, 8)
        bytes.set(small.subarray(headerEnd(small)), 8 + body.byteLength)
        await settle(parseHeader(bytes, bytes.byteLength, "json.safetensors"), headerTags)
      }),
      fuzzParams(300),
    )
  })
})

describe("safetensors file", () => {
  it("openSafetensors + every read: mutated files (header and data, truncations and insertions)", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(mutatedBytes(small, headerEnd(small)), mutatedBytes(small)),
        async (bytes) => {
          count("safetensors file")
          const path = fresh("m.safetensors")
          writeFileSync(path, bytes)
          try {
            await settle(openAndRead(path), fileTags)
          } finally {
            rmSync(path, { force: true })
          }
        },
      ),
      fuzzParams(150),
    )
  })
})

describe("safetensors index", () => {
  const indexText = JSON.stringify({
    metadata: { total_size: 48 },
    weight_map: { "a.weight": "model-00001-of-00002.safetensors", b: "model-00002-of-00002.safetensors" },
  })

  it("parseIndex: mutated index files", async () => {
    await fc.assert(
      fc.asyncProperty(mutatedJsonText(indexText), async (text) => {
        count("safetensors index")
        await settle(parseIndex(text, "model.safetensors.index.json"), indexTags)
      }),
      fuzzParams(400),
    )
  })

  it("openModelWeights: a model directory with a mutated index, then every tensor it names", async () => {
    const model = join(dir, "model")
    mkdirSync(model)
    writeFileSync(join(model, "model-00001-of-00002.safetensors"), small)
    writeFileSync(join(model, "model-00002-of-00002.safetensors"), small)
    await fc.assert(
      fc.asyncProperty(mutatedJsonText(indexText), async (text) => {
        count("safetensors index")
        writeFileSync(join(model, "model.safetensors.index.json"), text)
        await settle(
          Effect.scoped(
            Effect.gen(function* () {
              const w = yield* openModelWeights(model)
              for (const name of w.names) yield* w.readTensor(name)
            }),
          ),
          weightsTags,
        )
      }),
      fuzzParams(150),
    )
  })
})

describe("a model directory loaded onto devices", () => {
  const loadTags = [
    ...weightsTags,
    "MissingParameter",
    "ParameterShapeMismatch",
    "ConfigFileUnreadable",
    "InvalidConfig",
    "UnsupportedConfig",
    "ModelTypeMismatch",
    "HeadsNotDivisible",
    "IndivisibleDimension",
    "DeviceOutOfMemory",
  ]
  const config = readFileSync(join(fixtures, "hf", "llama", "config.json"), "utf8")

  it("loadModelHub: a mutated model.safetensors header or config.json places every parameter or fails with a typed error", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          mutatedBytes(fixture, headerEnd(fixture)).map((weights) => ({ weights, config })),
          mutatedJsonText(config).map((c) => ({ weights: fixture, config: c })),
        ),
        async ({ weights, config }) => {
          count("safetensors model load")
          const model = fresh("model")
          mkdirSync(model)
          writeFileSync(join(model, "model.safetensors"), weights)
          writeFileSync(join(model, "config.json"), config)
          try {
            await settle(
              Effect.scoped(
                Effect.asVoid(
                  loadModelHub(LlamaForCausalLM, model, LlamaForCausalLM.partitionRules, mesh([2, 1])),
                ),
              ),
              loadTags,
              { run: (e) => runtime.runPromiseExit(e), timeoutMs: 20_000 },
            )
          } finally {
            rmSync(model, { recursive: true, force: true })
          }
        },
      ),
      fuzzParams(40),
    )
  })
})
