/**
 * Checkpoint save and restore throughput of the Checkpointer (src/layers/Checkpointer.ts) for a
 * Llama-3.2-1B-shaped model (vocabulary 128256, 16 layers, width 2048, 32 heads / 8 KV heads,
 * head_dim 64, tied embeddings) with its AdamW state, all float32: params + mu + nu ≈ 15 GB. Next
 * to it, the raw sequential write and read bandwidth of the same disk, measured by `dd` in the
 * same run; the issue's target is 80% of raw both ways.
 *
 *   npx tsx bench/checkpoint.ts [--params 1.24e9] [--layers N] [--vocab 128256] [--hidden 2048]
 *     [--intermediate 8192] [--dir /tmp] [--repeats 2] [--dd-gb G] [--restore-arrays 2,8] [--no-verify] [--keep] [--cpu]
 *
 * --params picks the layer count that comes closest (--layers overrides it). A save is timed from
 * the call to the end of `wait` (snapshot to host memory, background write, every fsync and the
 * rename); the first save of a run also pays for touching fresh host memory, later ones reuse it,
 * as in training. A restore is timed from the call until the arrays are on the devices (the
 * device synchronised), and starts from a cold page cache: the whole cache dropped where that is
 * permitted, else the checkpoint's own files evicted with posix_fadvise (dd iflag=nocache). The
 * raw read likewise follows drop_caches, or bypasses the cache with O_DIRECT. Each restore is
 * checked bit for bit against the saved arrays (crc32c of every array; --no-verify skips it).
 * Writes bench/results/checkpoint-<parameters in millions>M-<date>.json.
 */
// As bin/magix.js: restores read many files at once (set before the first file operation).
process.env.UV_THREADPOOL_SIZE ??= "16"

import { mkdirSync, mkdtempSync, rmSync } from "node:fs"
import { freemem } from "node:os"
import { join, resolve } from "node:path"
import { crc32c } from "@node-rs/crc32"
import { Effect, Layer } from "effect"
import { parameterCount, parseConfig } from "../src/core/config.ts"
import { LlamaForCausalLM } from "../src/core/models/decoder.ts"
import { initParams } from "../src/core/models/init.ts"
import { adamw, chain, initializeOptState } from "../src/core/optim.ts"
import type { ShardedArray } from "../src/core/shardedArray.ts"
import { type ArrayTarget, Checkpointer } from "../src/layers/Checkpointer.ts"
import { CpuRuntime, createDeviceMesh, DefaultRuntime, Devices } from "../src/layers/Devices.ts"
import { coldCache, describeDisk, rawBandwidth, requireFree } from "./disk.ts"
import { cpuName, printTable, writeResult } from "./report.ts"

const arg = (name: string, fallback: number) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? Number(process.argv[i + 1]) : fallback
}
const argString = (name: string, fallback: string) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? process.argv[i + 1]! : fallback
}
const has = (flag: string) => process.argv.includes(`--${flag}`)

const TARGET = 0.8
const GB = 1e9
const rules = LlamaForCausalLM.partitionRules

const configJson = (layers: number) => ({
  model_type: "llama",
  vocab_size: arg("vocab", 128256),
  hidden_size: arg("hidden", 2048),
  intermediate_size: arg("intermediate", 8192),
  num_hidden_layers: layers,
  num_attention_heads: arg("heads", 32),
  num_key_value_heads: arg("kv-heads", 8),
  head_dim: arg("head-dim", 64),
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-5,
  tie_word_embeddings: true,
  rope_parameters: { rope_type: "default", rope_theta: 500000 },
})

/** The layer count whose model comes closest to `target` parameters (at least one layer). */
const layersFor = (target: number) =>
  Effect.gen(function* () {
    // A config needs at least one layer, so the fixed part is found from one and two layers.
    const one = parameterCount(yield* parseConfig(configJson(1)))
    const perLayer = parameterCount(yield* parseConfig(configJson(2))) - one
    return Math.max(1, Math.round((target - (one - perLayer)) / perLayer))
  })

/** crc32c of every array (one device each on the 1×1 mesh), read through one reused host buffer. */
const digests = (arrays: ReadonlyArray<readonly [string, ShardedArray]>) =>
  Effect.gen(function* () {
    const { backend } = yield* Devices
    let scratch = new Uint8Array(0)
    const out = new Map<string, number>()
    for (const [name, a] of arrays) {
      const bytes = a.bytesPerDevice
      if (scratch.byteLength < bytes) scratch = new Uint8Array(bytes)
      const view = scratch.subarray(0, bytes)
      backend.read(a.buffer(0), 0, bytes, view)
      out.set(name, crc32c(view))
    }
    return out
  })

const program = Effect.gen(function* () {
  const devices = yield* Devices
  const { engine } = devices
  const layers = has("layers") ? arg("layers", 16) : yield* layersFor(arg("params", 1.24e9))
  const config = yield* parseConfig(configJson(layers))
  const model = new LlamaForCausalLM(config)
  const parameters = parameterCount(config)
  // params, mu and nu in float32, plus a crc32c per chunk and the metadata documents (small).
  const checkpointBytes = 3 * parameters * 4
  const ddBytes = has("dd-gb") ? arg("dd-gb", 1) * GB : Math.max(checkpointBytes, 256 * 2 ** 20)
  const repeats = Math.max(1, arg("repeats", 2))
  const verify = !has("no-verify")
  const parent = resolve(argString("dir", "/tmp"))
  mkdirSync(parent, { recursive: true })
  const disk = describeDisk(parent)
  // One checkpoint step on disk at a time (each is removed after its restore); the dd file before.
  yield* requireFree(
    parent,
    Math.max(ddBytes, checkpointBytes) * 1.02 + 256 * 2 ** 20,
    `a checkpoint of ${(parameters / 1e9).toFixed(2)}B parameters with AdamW moments`,
  )
  // Host memory: the snapshot of a save (and on the CPU runtime the arrays themselves, twice
  // during a restore). Only a warning: the kernel's estimate of available memory is rough.
  const hostNeed = checkpointBytes * (devices.platform === "cpu" ? 3.2 : 1.2)
  if (freemem() < hostNeed)
    console.error(
      `warning: about ${(hostNeed / GB).toFixed(1)} GB of host memory wanted, ${(freemem() / GB).toFixed(1)} GB free`,
    )
  const device = devices.platform === "cpu" ? cpuName() : (devices.info[0]?.name ?? devices.platform)
  console.error(
    `model: ${layers} layers, vocabulary ${config.vocabSize}, width ${config.hiddenSize}: ${(parameters / 1e9).toFixed(3)}B parameters, ` +
      `checkpoint ≈ ${(checkpointBytes / GB).toFixed(2)} GB; ${device}; disk ${disk} under ${parent}`,
  )

  const base = yield* Effect.acquireRelease(
    Effect.sync(() => mkdtempSync(join(parent, "magix-ckpt-bench-"))),
    (dir) => Effect.sync(() => (has("keep") ? undefined : rmSync(dir, { recursive: true, force: true }))),
  )
  const raw = yield* rawBandwidth(join(base, "dd.bin"), ddBytes)
  console.error(
    `raw: write ${(raw.bytes / GB / raw.writeSeconds).toFixed(2)} GB/s, read ${(raw.bytes / GB / raw.readSeconds).toFixed(2)} GB/s (${raw.readMethod})`,
  )

  const mesh = yield* createDeviceMesh([1, 1])
  const t0 = performance.now()
  const params = yield* initParams(model, engine, mesh, rules, { seed: 0 })
  const optState = yield* initializeOptState(
    chain(adamw({ lr: 3e-4, weightDecay: 0.1 })),
    params,
    rules,
    mesh,
  )
  devices.backend.synchronize(0)
  console.error(`initialised in ${((performance.now() - t0) / 1000).toFixed(1)} s`)
  const saved = [
    ...Object.entries(params).map(([k, a]) => [`params/${k}`, a] as const),
    ...Object.entries(optState.mu).map(([k, a]) => [`mu/${k}`, a] as const),
    ...Object.entries(optState.nu).map(([k, a]) => [`nu/${k}`, a] as const),
    ["scalars", optState.scalars] as const,
  ]
  const expected = verify ? yield* digests(saved) : new Map<string, number>()
  const target = (a: ShardedArray): ArrayTarget => ({ shape: a.shape, dtype: a.dtype, sharding: a.sharding })
  const targets = {
    params: Object.fromEntries(Object.entries(params).map(([k, a]) => [k, target(a)])),
    optState: {
      mu: Object.fromEntries(Object.entries(optState.mu).map(([k, a]) => [k, target(a)])),
      nu: Object.fromEntries(Object.entries(optState.nu).map(([k, a]) => [k, target(a)])),
      scalars: target(optState.scalars),
    },
  }

  const ckptDir = join(base, "ckpt")
  const variantArrays = argString("restore-arrays", "")
    .split(",")
    .filter((x) => x !== "")
    .map(Number)
  const variants: Array<{ arrays: number; restore: number; cache: string }> = []
  const runs = yield* Effect.gen(function* () {
    const ckpt = yield* Checkpointer
    const out: Array<{
      save: number
      snapshot: number
      write: number
      bytes: number
      restore: number
      cache: string
      exact: boolean | undefined
    }> = []
    for (let step = 1; step <= repeats; step++) {
      const s0 = performance.now()
      yield* ckpt.save(step, {
        params,
        optState: { mu: optState.mu, nu: optState.nu, scalars: optState.scalars },
      })
      yield* ckpt.wait
      const save = (performance.now() - s0) / 1000
      const stats = yield* ckpt.stats
      const cache = yield* coldCache(join(ckptDir, String(step)))
      const r0 = performance.now()
      const restored = yield* ckpt.restore(step, targets)
      for (let d = 0; d < mesh.size; d++) devices.backend.synchronize(mesh.devices[d]!)
      const restore = (performance.now() - r0) / 1000
      const back = [
        ...Object.entries(restored.params).map(([k, a]) => [`params/${k}`, a] as const),
        ...Object.entries(restored.optState.mu).map(([k, a]) => [`mu/${k}`, a] as const),
        ...Object.entries(restored.optState.nu).map(([k, a]) => [`nu/${k}`, a] as const),
        ["scalars", restored.optState.scalars] as const,
      ]
      const exact = verify
        ? yield* digests(back).pipe(
            Effect.map(
              (got) => [...expected].every(([k, crc]) => got.get(k) === crc) && got.size === expected.size,
            ),
          )
        : undefined
      for (const [, a] of back) a.dispose()
      // --restore-arrays 2,8: the last step restored again (cold) with that many arrays at once.
      if (step === repeats)
        for (const n of variantArrays) {
          const how = yield* coldCache(join(ckptDir, String(step)))
          const v0 = performance.now()
          const again = yield* Effect.gen(function* () {
            return yield* (yield* Checkpointer).restore(step, targets)
          }).pipe(Effect.provide(Checkpointer.layer({ directory: ckptDir, maxConcurrentArrays: n })))
          for (let d = 0; d < mesh.size; d++) devices.backend.synchronize(mesh.devices[d]!)
          variants.push({ arrays: n, restore: (performance.now() - v0) / 1000, cache: how })
          console.error(`restore with ${n} arrays at once: ${variants.at(-1)!.restore.toFixed(2)} s`)
          for (const a of [
            ...Object.values(again.params),
            ...Object.values(again.optState.mu),
            ...Object.values(again.optState.nu),
            again.optState.scalars,
          ])
            a.dispose()
        }
      rmSync(join(ckptDir, String(step)), { recursive: true, force: true })
      out.push({
        save,
        snapshot: stats.snapshotMs / 1000,
        write: stats.writeMs / 1000,
        bytes: stats.bytesWritten,
        restore,
        cache,
        exact,
      })
      console.error(
        `step ${step}: save ${save.toFixed(2)} s (snapshot ${(stats.snapshotMs / 1000).toFixed(2)} s, write ${(stats.writeMs / 1000).toFixed(2)} s), ` +
          `restore ${restore.toFixed(2)} s${exact === undefined ? "" : exact ? ", bit-exact" : ", MISMATCH"}`,
      )
    }
    return out
  }).pipe(Effect.provide(Checkpointer.layer({ directory: ckptDir })))

  const rawWrite = raw.bytes / GB / raw.writeSeconds
  const rawRead = raw.bytes / GB / raw.readSeconds
  const rows: Array<Record<string, string | number>> = [
    {
      what: "raw write (dd conv=fsync)",
      GB: raw.bytes / GB,
      s: raw.writeSeconds,
      "GB/s": rawWrite,
      "of raw": "",
    },
    {
      what: `raw read (dd, ${raw.readMethod})`,
      GB: raw.bytes / GB,
      s: raw.readSeconds,
      "GB/s": rawRead,
      "of raw": "",
    },
  ]
  runs.forEach((r, i) => {
    const gb = r.bytes / GB
    rows.push(
      {
        what: `save ${i + 1}${i === 0 ? " (fresh host memory)" : ""}`,
        GB: gb,
        s: r.save,
        "GB/s": gb / r.save,
        "of raw": `${((100 * gb) / r.save / rawWrite).toFixed(0)}%`,
      },
      {
        what: `restore ${i + 1} (cold cache: ${r.cache})`,
        GB: gb,
        s: r.restore,
        "GB/s": gb / r.restore,
        "of raw": `${((100 * gb) / r.restore / rawRead).toFixed(0)}%`,
      },
    )
  })
  for (const v of variants) {
    const gb = runs.at(-1)!.bytes / GB
    rows.push({
      what: `restore, ${v.arrays} arrays at once (cold cache: ${v.cache})`,
      GB: gb,
      s: v.restore,
      "GB/s": gb / v.restore,
      "of raw": `${((100 * gb) / v.restore / rawRead).toFixed(0)}%`,
    })
  }
  printTable(rows)
  const last = runs.at(-1)!
  const saveRatio = last.bytes / GB / last.save / rawWrite
  const restoreRatio = last.bytes / GB / last.restore / rawRead
  const exact = runs.every((r) => r.exact !== false)
  console.log(
    `last run: save ${(100 * saveRatio).toFixed(0)}% and restore ${(100 * restoreRatio).toFixed(0)}% of raw ` +
      `(target ≥ ${100 * TARGET}%: ${saveRatio >= TARGET && restoreRatio >= TARGET ? "met" : "NOT met"}); ` +
      `${verify ? (exact ? "every restore bit-exact" : "a restore DIFFERS from what was saved") : "not verified"}`,
  )
  const size = `${Math.round(parameters / 1e6)}M`
  console.log(
    `wrote ${writeResult(`checkpoint-${size}`, device, {
      model: {
        shape: "Llama-3.2-1B",
        layers,
        vocab: config.vocabSize,
        hidden: config.hiddenSize,
        parameters,
      },
      platform: devices.platform,
      disk,
      directory: parent,
      raw: { ...raw, writeGBps: rawWrite, readGBps: rawRead },
      runs: runs.map((r) => ({
        ...r,
        saveGBps: r.bytes / GB / r.save,
        restoreGBps: r.bytes / GB / r.restore,
        saveOfRaw: r.bytes / GB / r.save / rawWrite,
        restoreOfRaw: r.bytes / GB / r.restore / rawRead,
      })),
      restoreVariants: variants,
      target: TARGET,
      met: saveRatio >= TARGET && restoreRatio >= TARGET,
      verified: verify,
      bitExact: verify ? exact : null,
    })}`,
  )
  if (!exact) process.exitCode = 1
})

Effect.runPromise(
  program.pipe(
    Effect.scoped,
    Effect.provide(Layer.mergeAll(has("cpu") ? CpuRuntime({ devices: 1 }) : DefaultRuntime())),
  ),
).catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : String(e))
  process.exitCode = 1
})
