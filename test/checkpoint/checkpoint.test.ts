/**
 * Checkpoints: Zarr v3 that an independent reader (zarrita) opens; bit-exact restore from any
 * mesh to any mesh and rule set, each device reading only the chunks that overlap its slice;
 * corruption, retention, background saving, a full disk.
 */
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { FileSystemStore } from "@zarrita/storage"
import { Effect, Fiber, Layer, Option, type Scope } from "effect"
import { describe, expect, it } from "vitest"
import * as zarr from "zarrita"
import { LlamaForCausalLM } from "../../src/core/models/decoder.ts"
import { type PartitionRules, rulesWithout, specFor } from "../../src/core/partitionRules.ts"
import { fromHost, type ShardedArray, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { chunksOverlapping } from "../../src/core/zarr.ts"
import { type ArrayTarget, Checkpointer, type CheckpointIO, nodeIO } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { fixtures, mesh } from "../helpers.ts"

const tmp = () => mkdtempSync(join(tmpdir(), "magix-ckpt-"))

const withCheckpointer = <A, E>(
  devices: number,
  directory: string,
  effect: Effect.Effect<A, E, Devices | Checkpointer | Hub | Scope.Scope>,
  options: Partial<Parameters<typeof Checkpointer.layer>[0]> = {},
) =>
  Effect.runPromise(
    effect.pipe(
      Effect.provide(Checkpointer.layer({ directory, ...options })),
      Effect.scoped,
      Effect.provide(Layer.mergeAll(CpuRuntime({ devices }), Hub.localDirectory(join(fixtures, "hf")))),
    ),
  )

const hostParams = (params: Readonly<Record<string, ShardedArray>>) =>
  Object.fromEntries(Object.entries(params).map(([k, v]) => [k, toHost(v)]))

const targets = (
  params: Readonly<Record<string, ShardedArray>>,
  rules: PartitionRules,
  m: ReturnType<typeof mesh>,
) =>
  Object.fromEntries(
    Object.entries(params).map(([k, v]) => [
      k,
      {
        shape: v.shape,
        dtype: v.dtype,
        sharding: new NamedSharding(m, specFor(rules, k, v.shape)),
      } satisfies ArrayTarget,
    ]),
  )

describe("zarr chunk arithmetic", () => {
  it("lists the chunks overlapping a block with the shared boxes", () => {
    const o = chunksOverlapping([8, 6], [4, 3], { offsets: [2, 0], shape: [4, 6] })
    expect(o.map((c) => c.coords)).toEqual([
      [0, 0],
      [0, 1],
      [1, 0],
      [1, 1],
    ])
    expect(o[0]!.box).toEqual({ offsets: [2, 0], shape: [2, 3] })
    expect(o[3]!.box).toEqual({ offsets: [4, 3], shape: [2, 3] })
  })
})

describe("a saved checkpoint", () => {
  it("is Zarr v3 that zarrita reads back to the same arrays, with a manifest", async () => {
    const dir = tmp()
    const saved = await withCheckpointer(
      4,
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const m = mesh([2, 2])
        const { params } = yield* loadModelHub(LlamaForCausalLM, "llama", LlamaForCausalLM.partitionRules, m)
        const { engine } = yield* Devices
        const ints = yield* fromHost(
          engine,
          Int32Array.from({ length: 24 }, (_, i) => i * 3 - 7),
          [4, 6],
          "int32",
          new NamedSharding(m, P("data")),
        )
        yield* ckpt.save(
          7,
          { params, extra: { ints } },
          { rules: LlamaForCausalLM.partitionRules, dataPosition: { steps: 7 } },
        )
        yield* ckpt.wait
        return { params: hostParams(params), ints: toHost(ints) }
      }),
    )
    const store = new FileSystemStore(join(dir, "7"))
    for (const name of [
      "model.embed_tokens.weight",
      "model.layers.1.mlp.down_proj.weight",
      "model.norm.weight",
    ]) {
      const arr = await zarr.open(zarr.root(store).resolve(`params/${name}`), { kind: "array" })
      const got = await zarr.get(arr)
      expect(Array.from(got.data as Float32Array)).toEqual(Array.from(saved.params[name] as Float32Array))
    }
    const ints = await zarr.get(await zarr.open(zarr.root(store).resolve("extra/ints"), { kind: "array" }))
    expect(Array.from(ints.data as Int32Array)).toEqual(Array.from(saved.ints as Int32Array))
    const manifest = JSON.parse(readFileSync(join(dir, "7", "manifest.json"), "utf8"))
    expect(manifest.step).toBe(7)
    expect(manifest.mesh).toEqual({ shape: [2, 2], axisNames: ["data", "model"] })
    expect(manifest.dataPosition).toEqual({ steps: 7 })
    expect(manifest.rules.length).toBe(LlamaForCausalLM.partitionRules.length)
    // Chunked by the saving sharding: embed_tokens P(data, model) on 2×2 is a 2×2 grid.
    expect(readdirSync(join(dir, "7", "params", "model.embed_tokens.weight", "c")).sort()).toEqual(["0", "1"])
  })
})

describe("restore onto any mesh and rules", () => {
  const meshes: Array<[number, number]> = [
    [1, 1],
    [2, 2],
    [4, 1],
    [1, 4],
  ]
  it("every saving mesh restores bit-exactly onto every other, reading only overlapping chunks", async () => {
    for (const from of meshes) {
      const dir = tmp()
      const original = await withCheckpointer(
        from[0] * from[1],
        dir,
        Effect.gen(function* () {
          const ckpt = yield* Checkpointer
          const { params } = yield* loadModelHub(
            LlamaForCausalLM,
            "llama",
            LlamaForCausalLM.partitionRules,
            mesh(from),
          )
          yield* ckpt.save(1, { params })
          yield* ckpt.wait
          return hostParams(params)
        }),
      )
      const ruleSets: Array<[string, PartitionRules]> = [
        ["default", LlamaForCausalLM.partitionRules],
        ["fsdp", rulesWithout(LlamaForCausalLM.partitionRules, "model")],
        ["tensor", rulesWithout(LlamaForCausalLM.partitionRules, "data")],
      ]
      for (const to of meshes) {
        for (const [ruleName, rules] of ruleSets) {
          const { restored, perPosition, expectedPerPosition } = await withCheckpointer(
            to[0] * to[1],
            dir,
            Effect.gen(function* () {
              const ckpt = yield* Checkpointer
              const m = mesh(to)
              const { params } = yield* loadModelHub(LlamaForCausalLM, "llama", rules, m)
              const out = yield* ckpt.restore(1, { params: targets(params, rules, m) })
              const stats = yield* ckpt.stats
              // What each position must read: the chunks overlapping its block, as saved from `from`.
              const savedMesh = mesh(from)
              const expectedPerPosition = new Array<number>(m.size).fill(0)
              for (const [name, p] of Object.entries(params)) {
                const saved = new NamedSharding(
                  savedMesh,
                  specFor(LlamaForCausalLM.partitionRules, name, p.shape),
                )
                const chunk = saved.shardShape(p.shape)
                for (let q = 0; q < m.size; q++)
                  expectedPerPosition[q]! +=
                    chunksOverlapping(
                      p.shape,
                      chunk,
                      new NamedSharding(m, specFor(rules, name, p.shape)).slice(q, p.shape),
                    ).length *
                    (chunk.reduce((a, b) => a * b, 1) * 4 + 4)
              }
              return {
                restored: hostParams(out.params as Record<string, ShardedArray>),
                perPosition: stats.restoreBytesPerPosition,
                expectedPerPosition,
              }
            }),
          )
          for (const [k, v] of Object.entries(original))
            expect(restored[k], `${from}→${to} ${ruleName} ${k}`).toEqual(v)
          expect(perPosition).toEqual(expectedPerPosition)
        }
      }
    }
  }, 300_000)

  it("parameters alone restore without the optimizer state", async () => {
    const dir = tmp()
    await withCheckpointer(
      1,
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const m = mesh([1, 1])
        const { params } = yield* loadModelHub(LlamaForCausalLM, "llama", LlamaForCausalLM.partitionRules, m)
        yield* ckpt.save(3, { params, optState: { mu: params } })
        yield* ckpt.wait
        const out = yield* ckpt.restore(3, { params: targets(params, LlamaForCausalLM.partitionRules, m) })
        expect(Object.keys(out)).toEqual(["params"])
      }),
    )
  })
})

describe("integrity and lifecycle", () => {
  const saveOne = (
    dir: string,
    step: number,
    value: number,
    options: Partial<Parameters<typeof Checkpointer.layer>[0]> = {},
  ) =>
    withCheckpointer(
      2,
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const { engine } = yield* Devices
        const m = mesh([2, 1])
        const w = yield* fromHost(
          engine,
          new Float32Array(64).fill(value),
          [8, 8],
          "float32",
          new NamedSharding(m, P("data")),
        )
        yield* ckpt.save(step, { params: { w } })
        yield* ckpt.wait
      }),
      options,
    )
  const restoreW = (dir: string, step: number) =>
    withCheckpointer(
      2,
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const m = mesh([2, 1])
        const out = yield* ckpt.restore(step, {
          params: { w: { shape: [8, 8], dtype: "float32", sharding: new NamedSharding(m, P()) } },
        })
        return Array.from(toHost((out.params as { w: ShardedArray }).w) as Float32Array)
      }),
    )

  it("a flipped byte in a chunk is a typed error naming the array and the chunk", async () => {
    const dir = tmp()
    await saveOne(dir, 1, 1.5)
    const chunk = join(dir, "1", "params", "w", "c", "1", "0")
    const bytes = readFileSync(chunk)
    bytes[9]! ^= 0x10
    writeFileSync(chunk, bytes)
    const err = await Effect.runPromise(
      Effect.flip(Effect.tryPromise({ try: () => restoreW(dir, 1), catch: (e) => e })),
    )
    expect(String((err as Error).message ?? err)).toContain("c/1/0")
    expect(String((err as Error).message ?? err)).toContain("params/w")
    expect(String((err as Error).message ?? err)).toContain("crc32c")
  })

  it("maxToKeep, latestStep and saveInterval behave like orbax's CheckpointManager", async () => {
    const dir = tmp()
    const steps = await withCheckpointer(
      1,
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const { engine } = yield* Devices
        const w = yield* fromHost(
          engine,
          new Float32Array(4),
          [4],
          "float32",
          new NamedSharding(mesh([1, 1]), P()),
        )
        expect(Option.isNone(yield* ckpt.latestStep)).toBe(true)
        const saved: number[] = []
        for (let s = 1; s <= 10; s++)
          if (ckpt.shouldSave(s, s === 10)) {
            saved.push(s)
            yield* ckpt.save(s, { params: { w } })
          }
        yield* ckpt.wait
        return { saved, all: yield* ckpt.allSteps, latest: yield* ckpt.latestStep }
      }),
      { saveInterval: 3, maxToKeep: 2 },
    )
    expect(steps.saved).toEqual([3, 6, 9, 10])
    expect(steps.all).toEqual([9, 10])
    expect(Option.getOrThrow(steps.latest)).toBe(10)
  })

  it("saving runs in the background: other work goes on while a large save is written", async () => {
    const dir = tmp()
    const ticks = await withCheckpointer(
      1,
      dir,
      Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        const { engine } = yield* Devices
        const big = yield* fromHost(
          engine,
          new Float32Array(24 << 20).fill(3),
          [24, 1 << 20],
          "float32",
          new NamedSharding(mesh([1, 1]), P()),
        )
        yield* ckpt.save(1, { params: { big } })
        // The save returned after its snapshot; count what we get done before it lands.
        let ticks = 0
        const counter = yield* Effect.forkChild(
          Effect.forever(Effect.sync(() => ticks++).pipe(Effect.andThen(Effect.sleep("1 millis")))),
        )
        yield* ckpt.wait
        yield* Fiber.interrupt(counter)
        return ticks
      }),
      { maxConcurrentWrites: 2 },
    )
    expect(ticks).toBeGreaterThan(3)
  })

  it("a full disk is a typed error, leaves no partial step and keeps the previous checkpoint", async () => {
    const dir = tmp()
    await saveOne(dir, 1, 2.5)
    let writes = 0
    const fullDisk: CheckpointIO = {
      ...nodeIO,
      writeFile: async (path, data) => {
        if (++writes > 3)
          throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" })
        return nodeIO.writeFile(path, data)
      },
    }
    const err = await Effect.runPromise(
      Effect.flip(Effect.tryPromise({ try: () => saveOne(dir, 2, 9, { io: fullDisk }), catch: (e) => e })),
    )
    expect(String((err as Error).message)).toContain("no space left")
    expect(readdirSync(dir).sort()).toEqual(["1"])
    expect(await restoreW(dir, 1)).toEqual(new Array(64).fill(2.5))
  })
})
