/**
 * The CUDA backend against the CPU backend (the reference) and the transformers fixtures. Runs
 * with `npm run test:gpu` on a machine with a GPU; skipped everywhere else.
 *
 * Every op is checked forward and backward through the same TypeScript ops the model uses: the
 * op's output, the loss Σ op(x)·W and its gradients on CUDA equal the CPU's — within 2e-5 in float32 (cuBLASLt and
 * the kernels sum in other orders and use fast exponentials), within 1e-2 in bfloat16 against
 * float32 results on the same bf16-rounded inputs. NaN never passes.
 */
import { join } from "node:path"
import { Effect, Layer, type Scope } from "effect"
import { describe, expect, it } from "vitest"
import { valueAndGrad } from "../../src/core/autodiff.ts"
import { convertHost, type DType } from "../../src/core/dtype.ts"
import type { Engine } from "../../src/core/engine.ts"
import { placeBatch } from "../../src/core/models/batch.ts"
import { modelClassFor, type Params } from "../../src/core/models/decoder.ts"
import { attention } from "../../src/core/ops/attention.ts"
import { crossEntropyLoss } from "../../src/core/ops/crossEntropy.ts"
import { castTo, weightedSum } from "../../src/core/ops/elementwise.ts"
import { embedding } from "../../src/core/ops/embedding.ts"
import { glu } from "../../src/core/ops/glu.ts"
import { linear } from "../../src/core/ops/linear.ts"
import { rmsnorm } from "../../src/core/ops/rmsnorm.ts"
import { rope } from "../../src/core/ops/rope.ts"
import {
  adamw,
  applyUpdates,
  chain,
  clipByGlobalNorm,
  initializeOptState,
  readScalars,
} from "../../src/core/optim.ts"
import { fromHost, type ShardedArray, shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { CpuRuntime, CudaRuntime, Devices, gpuAvailable } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { loadNative } from "../../src/native/index.ts"
import { checkReadLater } from "../core/readLaterCheck.ts"
import { families, fixtures, mesh, readReference, referenceBatch, relErr } from "../helpers.ts"

const gpu = gpuAvailable()
const hub = Hub.localDirectory(join(fixtures, "hf"))
const onCuda = <A, E>(e: Effect.Effect<A, E, Devices | Hub | Scope.Scope>) =>
  Effect.runPromise(e.pipe(Effect.scoped, Effect.provide(Layer.mergeAll(CudaRuntime, hub))))
const onCpu = <A, E>(e: Effect.Effect<A, E, Devices | Hub | Scope.Scope>) =>
  Effect.runPromise(e.pipe(Effect.scoped, Effect.provide(Layer.mergeAll(CpuRuntime({ devices: 1 }), hub))))

let seed = 11
const rand = (n: number, scale = 1) =>
  Float32Array.from({ length: n }, () => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0
    return (seed / 2 ** 32 - 0.5) * 2 * scale
  })
/** Rounds through bfloat16 so both backends see the same values. */
const bfRound = (x: Float32Array) =>
  convertHost(convertHost(x, "float32", "bfloat16"), "bfloat16", "float32") as Float32Array

interface In {
  readonly shape: number[]
  readonly data: Float32Array
}

/** Loss Σ f(x)·W and gradients, with inputs placed as `dtype` (the op computes in it). */
const lossAndGrads = (
  engine: Engine,
  inputs: Record<string, In>,
  W: Float32Array,
  dtype: DType,
  f: (x: Record<string, ShardedArray>) => ShardedArray,
) =>
  engine.tidy(() => {
    const m = mesh([1, 1])
    const xs = Object.fromEntries(
      Object.entries(inputs).map(([k, v]) => [
        k,
        Effect.runSync(fromHost(engine, v.data, v.shape, "float32", new NamedSharding(m, P()), k)),
      ]),
    ) as Record<string, ShardedArray>
    let output: ArrayLike<number> = []
    const { value, grads } = valueAndGrad((p: Record<string, ShardedArray>) => {
      const cast = Object.fromEntries(Object.entries(p).map(([k, v]) => [k, castTo(v, dtype)]))
      const y = castTo(f(cast), "float32")
      output = toHost(y) as Float32Array
      const w = Effect.runSync(fromHost(engine, W, y.shape, "float32", new NamedSharding(m, y.spec)))
      return weightedSum(y, w)
    })(xs)
    return {
      loss: Number(shardToHost(value, 0)[0]),
      output,
      grads: Object.fromEntries(Object.entries(grads).map(([k, g]) => [k, toHost(g) as Float32Array])),
    }
  })

const compare = async (
  name: string,
  inputs: Record<string, In>,
  outSize: number,
  f: (x: Record<string, ShardedArray>, engine: Engine) => ShardedArray,
) => {
  const W = rand(outSize)
  for (const dtype of ["float32", "bfloat16"] as const) {
    const ins =
      dtype === "bfloat16"
        ? Object.fromEntries(Object.entries(inputs).map(([k, v]) => [k, { ...v, data: bfRound(v.data) }]))
        : inputs
    const run = (d: DType) =>
      Effect.gen(function* () {
        const { engine } = yield* Devices
        return lossAndGrads(engine, ins, W, d, (x) => f(x, engine))
      })
    const ref = await onCpu(run("float32"))
    const got = await onCuda(run(dtype))
    const tol = dtype === "float32" ? 2e-5 : 1e-2
    // The scalar Σ y·W cancels heavily, so bf16 is judged on the op's output itself.
    if (dtype === "float32") expect(relErr([got.loss], [ref.loss]), `${name} loss`).toBeLessThan(tol)
    expect(relErr(got.output, ref.output), `${name} ${dtype} output`).toBeLessThan(tol)
    for (const k of Object.keys(ref.grads))
      expect(relErr(got.grads[k]!, ref.grads[k]!), `${name} ${dtype} d${k}`).toBeLessThan(tol * 2)
  }
}

describe.skipIf(!gpu)("CUDA runtime", () => {
  it("enumerates the GPUs and their memory", async () => {
    const info = await onCuda(Effect.map(Devices, (d) => d.info))
    expect(info.length).toBeGreaterThan(0)
    expect(info[0]!.memory).toBeGreaterThan(2 ** 30)
    const probe = loadNative().cudaProbe()
    expect(typeof probe.cublasLt).toBe("number")
    expect(typeof probe.nccl).toBe("number")
  })

  it("host copies round-trip through every path: small, staged pageable, pinned, at offsets", () => {
    const addon = loadNative()
    const be = addon.createCuda(1)
    try {
      const n = (70 << 20) + 13 // three staging pieces and a ragged end
      const id = be.alloc(0, n + 64)
      const src = new Uint8Array(n)
      for (let i = 0; i < n; i++) src[i] = (i * 2654435761) >>> 24
      for (const [what, make] of [
        ["pageable", (k: number) => new Uint8Array(k)],
        ["pinned", (k: number) => new Uint8Array(addon.hostBuffer(k, true))],
        ["huge-page", (k: number) => new Uint8Array(addon.hostBuffer(k, false))],
      ] as const) {
        const from = make(n)
        from.set(src)
        be.write(id, 64, from)
        const back = make(n)
        be.read(id, 64, n, back)
        expect(Buffer.compare(back, src), what).toBe(0)
        const small = be.read(id, 64 + 1000, 100)
        expect(Buffer.compare(small, src.subarray(1000, 1100)), what).toBe(0)
      }
      be.free(id)
    } finally {
      be.dispose()
    }
  })

  it("a read started before later writes returns the value at its start (readLater)", () =>
    onCuda(
      Effect.gen(function* () {
        const { engine } = yield* Devices
        checkReadLater(engine.backend)
      }),
    ))

  it("out of memory is a typed error with the request, the free bytes and the largest allocations", async () => {
    const err = await onCuda(
      Effect.gen(function* () {
        const d = yield* Devices
        yield* d.allocate(0, 2 ** 30)
        return yield* Effect.flip(d.allocate(0, 2 ** 41))
      }),
    )
    expect(err._tag).toBe("DeviceOutOfMemory")
    expect(err.requested).toBe(2 ** 41)
    expect(err.free).toBeGreaterThan(0)
    expect(err.largest).toContain("1024 MiB")
  })
})

describe.skipIf(!gpu)("every op on CUDA equals the CPU backend", () => {
  it("linear (FSDP/TP-free shapes)", () =>
    compare(
      "linear",
      {
        x: { shape: [4, 33, 96], data: rand(4 * 33 * 96) },
        w: { shape: [80, 96], data: rand(80 * 96, 0.2) },
      },
      4 * 33 * 80,
      (v) => linear(v.x!, v.w!),
    ))
  it("rmsnorm (both offsets)", async () => {
    for (const off of [0, 1] as const)
      await compare(
        `rmsnorm ${off}`,
        { x: { shape: [6, 7, 320], data: rand(6 * 7 * 320) }, w: { shape: [320], data: rand(320) } },
        6 * 7 * 320,
        (v) => rmsnorm(v.x!, v.w!, 1e-5, off),
      )
  })
  it("glu (both activations)", async () => {
    for (const act of ["silu", "gelu_tanh"] as const)
      await compare(
        `glu ${act}`,
        { g: { shape: [5, 300], data: rand(1500, 2) }, u: { shape: [5, 300], data: rand(1500) } },
        1500,
        (v) => glu(v.g!, v.u!, act),
      )
  })
  it("embedding with ids outside the table", () =>
    compare("embedding", { t: { shape: [50, 64], data: rand(3200) } }, 3 * 9 * 64, (v, engine) => {
      const ids = Effect.runSync(
        fromHost(
          engine,
          Int32Array.from({ length: 27 }, (_, i) => (i * 7) % 55),
          [3, 9],
          "int32",
          new NamedSharding(mesh([1, 1]), P()),
        ),
      )
      return embedding(ids, v.t!)
    }))
  it("rope", () =>
    compare(
      "rope",
      { x: { shape: [2, 40, 4, 64], data: rand(2 * 40 * 4 * 64) } },
      2 * 40 * 4 * 64,
      (v, engine) => {
        const m = mesh([1, 1])
        const pos = Effect.runSync(
          fromHost(
            engine,
            Int32Array.from({ length: 80 }, (_, i) => (i * 37) % 1000),
            [2, 40],
            "int32",
            new NamedSharding(m, P()),
          ),
        )
        const inv = Effect.runSync(
          fromHost(
            engine,
            Float32Array.from({ length: 32 }, (_, i) => 10000 ** (-i / 32)),
            [32],
            "float32",
            new NamedSharding(m, P()),
          ),
        )
        return rope(v.x!, pos, inv)
      },
    ))
  it.each([64, 128, 16])("attention, head size %i: causal GQA, window, mask, offset", async (hd) => {
    const B = 2
    const T = 70
    for (const o of [
      { causal: true },
      { causal: true, window: 17 },
      { causal: true, mask: true },
      { causal: false },
    ]) {
      await compare(
        `attention ${hd} ${JSON.stringify(o)}`,
        {
          q: { shape: [B, T, 4, hd], data: rand(B * T * 4 * hd) },
          k: { shape: [B, T, 2, hd], data: rand(B * T * 2 * hd) },
          v: { shape: [B, T, 2, hd], data: rand(B * T * 2 * hd) },
        },
        B * T * 4 * hd,
        (x, engine) => {
          const keyMask =
            "mask" in o
              ? Effect.runSync(
                  fromHost(
                    engine,
                    Uint8Array.from({ length: B * T }, (_, i) => (i % 9 === 0 ? 0 : 1)),
                    [B, T],
                    "uint8",
                    new NamedSharding(mesh([1, 1]), P()),
                  ),
                )
              : undefined
          return attention(x.q!, x.k!, x.v!, {
            causal: o.causal,
            ...("window" in o ? { window: o.window } : {}),
            ...(keyMask ? { keyMask } : {}),
          })
        },
      )
    }
  })
  it("fused cross-entropy over several vocabulary chunks with ignored targets", () =>
    compare(
      "cross-entropy",
      { h: { shape: [3, 50, 64], data: rand(9600) }, w: { shape: [5000, 64], data: rand(320000, 0.3) } },
      1,
      (v, engine) => {
        const m = mesh([1, 1])
        const tg = Effect.runSync(
          fromHost(
            engine,
            Int32Array.from({ length: 150 }, (_, i) => (i % 11 === 0 ? -100 : (i * 97) % 5000)),
            [3, 50],
            "int32",
            new NamedSharding(m, P()),
          ),
        )
        const rs = Effect.runSync(
          fromHost(
            engine,
            new Float32Array(150).fill(1 / 136),
            [3, 50],
            "float32",
            new NamedSharding(m, P()),
          ),
        )
        return crossEntropyLoss(v.h!, v.w!, tg, rs)
      },
    ))

  it("the fused AdamW with clipping: five steps equal the CPU's", async () => {
    const p0 = rand(4000)
    const grads = [1, 2, 3, 4, 5].map(() => rand(4000, 3))
    const run = Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh([1, 1])
      const s = new NamedSharding(m, P())
      const p = yield* fromHost(engine, p0, [40, 100], "float32", s)
      const opt = chain(clipByGlobalNorm(1), adamw({ lr: 1e-2, weightDecay: 0.1 }))
      const st = yield* initializeOptState(opt, { p }, [], m)
      for (const g of grads)
        applyUpdates(opt, { p }, { p: yield* fromHost(engine, g, [40, 100], "float32", s) }, st)
      return { p: toHost(p) as Float32Array, norm: readScalars(st).gradNorm }
    })
    const ref = await onCpu(run)
    const got = await onCuda(run)
    expect(relErr(got.p, ref.p)).toBeLessThan(1e-5)
    expect(relErr([got.norm], [ref.norm])).toBeLessThan(1e-5)
  })
})

describe.skipIf(!gpu)("models on CUDA", () => {
  const modelTypeOf = (family: string) =>
    (family === "llama3" ? "llama" : family) as "llama" | "mistral" | "gemma"
  it.each(families)(
    "%s: logits, loss and gradients against transformers, float32 and bfloat16",
    async (family) => {
      for (const dtype of ["float32", "bfloat16"] as const) {
        const r = await onCuda(
          Effect.gen(function* () {
            const { engine } = yield* Devices
            const m = mesh([1, 1])
            const Model = modelClassFor(modelTypeOf(family))
            const { model, params } = yield* loadModelHub(Model, family, Model.partitionRules, m)
            model.computeDtype = dtype
            const ref = yield* readReference(join(fixtures, "hf", family, "reference.safetensors"))
            const { batch } = yield* placeBatch(engine, m, referenceBatch(ref))
            const logits = engine.tidy(() =>
              toHost(castTo(model.logits(params, model.forward(params, batch)), "float32")),
            )
            const { value, grads } = valueAndGrad((p: Params) => model.loss(p, batch))(params)
            const worst = Math.max(
              ...Object.entries(grads).map(([k, g]) =>
                relErr(toHost(g) as Float32Array, ref[`grad.${k}`]!.data),
              ),
            )
            return {
              logits: relErr(logits as Float32Array, ref.logits!.data),
              loss: relErr([Number(shardToHost(value, 0)[0])], ref.loss!.data),
              worst,
            }
          }),
        )
        const tol = dtype === "float32" ? { out: 2e-5, grad: 1e-4 } : { out: 2e-2, grad: 5e-2 }
        expect(r.logits, `${family} ${dtype} logits`).toBeLessThan(tol.out)
        expect(r.loss, `${family} ${dtype} loss`).toBeLessThan(tol.out)
        expect(r.worst, `${family} ${dtype} gradients`).toBeLessThan(tol.grad)
      }
    },
  )
})

describe.skipIf(!gpu)("NCCL", () => {
  it("collectives on a communicator of the GPUs present equal the in-process ones", async () => {
    const addon = loadNative()
    const gpus = addon.cudaProbe().devices
    const native = addon.createCuda()
    const cpu = addon.createCpu(gpus)
    try {
      const devices = Array.from({ length: gpus }, (_, i) => i)
      const comm = native.createCommunicator(devices)
      const op = (b: typeof native, name: string) => b.opNames().indexOf(name)
      const n = 1000
      const inputs = devices.map(() => rand(n))
      const place = (b: typeof native, data: Float32Array[], len = n) =>
        data.map((d, i) => {
          const id = b.alloc(i, len * 4)
          b.write(id, 0, d)
          return id
        })
      const read = (b: typeof native, ids: number[], len = n) =>
        ids.map((id) => new Float32Array(b.read(id, 0, len * 4).buffer.slice(0)))
      for (const [name, args] of [
        ["all_reduce", [0, n, 0]],
        ["all_reduce", [0, n, 1]],
      ] as const) {
        const g = place(native, inputs)
        const c = place(cpu, inputs)
        native.exec(op(native, name), g, [...args, comm])
        cpu.exec(op(cpu, name), c, [...args, 0])
        expect(read(native, g)).toEqual(read(cpu, c))
      }
      const gIn = place(native, inputs)
      const gOut = place(
        native,
        devices.map(() => new Float32Array(n * gpus)),
        n * gpus,
      )
      native.exec(op(native, "all_gather"), [...gIn, ...gOut], [4, gpus, n, comm])
      const gathered = read(native, gOut, n * gpus)
      for (const row of gathered) expect(Array.from(row)).toEqual(inputs.flatMap((x) => Array.from(x)))
      native.destroyCommunicator(comm)
    } finally {
      native.dispose()
      cpu.dispose()
    }
  })
})
