/**
 * Every op's backward pass against central finite differences, in float64, through the autodiff
 * tape (the native backward kernels and the TypeScript rules together): the loss is Σ op(x)·W
 * for a random W, and sampled elements of every input are perturbed by ±h.
 */
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { valueAndGrad } from "../../src/core/autodiff.ts"
import type { DType } from "../../src/core/dtype.ts"
import type { Engine } from "../../src/core/engine.ts"
import type { Mesh } from "../../src/core/mesh.ts"
import { attention } from "../../src/core/ops/attention.ts"
import { crossEntropyLoss } from "../../src/core/ops/crossEntropy.ts"
import { add, scale, weightedSum } from "../../src/core/ops/elementwise.ts"
import { embedding } from "../../src/core/ops/embedding.ts"
import { glu } from "../../src/core/ops/glu.ts"
import { mergeHeads, splitHeads } from "../../src/core/ops/heads.ts"
import { linear } from "../../src/core/ops/linear.ts"
import { rmsnorm } from "../../src/core/ops/rmsnorm.ts"
import { rope } from "../../src/core/ops/rope.ts"
import { fromHost, type ShardedArray, shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P, type PartitionSpec } from "../../src/core/sharding.ts"
import { mesh, withEngine } from "../helpers.ts"

let seed = 7
const rand = () => {
  seed = (Math.imul(seed, 1103515245) + 12345) >>> 0
  return seed / 2 ** 32 - 0.5
}
const randArray = (n: number, scale = 1) => Float64Array.from({ length: n }, () => rand() * 2 * scale)

interface Input {
  readonly shape: number[]
  readonly data: Float64Array
  readonly spec?: PartitionSpec
}

/**
 * Checks d/dx Σ f(x)·W for each input of f against central differences at sampled elements.
 * `f` receives the arrays in order; `consts` are non-differentiable extras it closes over.
 */
const gradcheck = (
  engine: Engine,
  m: Mesh,
  inputs: Record<string, Input>,
  f: (xs: Record<string, ShardedArray>) => ShardedArray,
  samples = 6,
  h = 1e-6,
) => {
  const dtype: DType = "float64"
  const place = (vals: Record<string, Float64Array>) =>
    Object.fromEntries(
      Object.entries(inputs).map(([k, inp]) => [
        k,
        Effect.runSync(
          fromHost(engine, vals[k]!, inp.shape, dtype, new NamedSharding(m, inp.spec ?? P()), k),
        ),
      ]),
    ) as Record<string, ShardedArray>
  const base = Object.fromEntries(Object.entries(inputs).map(([k, v]) => [k, v.data]))
  let W: Float64Array | undefined
  let outShape: ReadonlyArray<number> = []
  const loss = (xs: Record<string, ShardedArray>) => {
    const y = f(xs)
    if (!W) {
      outShape = y.shape
      W = randArray(y.size)
    }
    const w = Effect.runSync(fromHost(engine, W, y.shape, dtype, new NamedSharding(m, y.spec), "W"))
    return weightedSum(y, w)
  }
  const evaluate = (vals: Record<string, Float64Array>) =>
    engine.tidy(() => Number(shardToHost(loss(place(vals)), 0)[0]))
  evaluate(base)
  const grads = engine.tidy(() => {
    const xs = place(base)
    const { grads } = valueAndGrad((p: Record<string, ShardedArray>) => loss(p))(xs)
    return Object.fromEntries(Object.entries(grads).map(([k, g]) => [k, toHost(g) as Float64Array]))
  })
  let worst = 0
  for (const [name, inp] of Object.entries(inputs)) {
    for (let s = 0; s < samples; s++) {
      const i = Math.floor((s + 0.5) * (inp.data.length / samples))
      const plus = { ...base, [name]: Float64Array.from(inp.data) }
      const minus = { ...base, [name]: Float64Array.from(inp.data) }
      plus[name]![i]! += h
      minus[name]![i]! -= h
      const numeric = (evaluate(plus) - evaluate(minus)) / (2 * h)
      const analytic = grads[name]![i]!
      const err = Math.abs(numeric - analytic) / Math.max(Math.abs(numeric), Math.abs(analytic), 1e-3)
      worst = Math.max(worst, err)
      expect(err, `${name}[${i}] analytic ${analytic} numeric ${numeric}`).toBeLessThan(1e-6)
    }
  }
  return { worst, outShape }
}

describe("finite-difference checks in float64", () => {
  it("linear, scale and add", () =>
    withEngine(1, (e) => {
      const m = mesh([1, 1])
      gradcheck(
        e,
        m,
        { x: { shape: [2, 3, 5], data: randArray(30) }, w: { shape: [4, 5], data: randArray(20) } },
        (v) => add(scale(linear(v.x!, v.w!), 1.5), linear(v.x!, v.w!)),
      )
    }))

  it("embedding (vocabulary rows and ids out of range)", () =>
    withEngine(1, (e) => {
      const m = mesh([1, 1])
      const ids = Effect.runSync(
        fromHost(e, Int32Array.from([1, 4, 4, 0, 2, 6]), [2, 3], "int32", new NamedSharding(m, P()), "ids"),
      )
      gradcheck(e, m, { t: { shape: [5, 4], data: randArray(20) } }, (v) => embedding(ids, v.t!))
    }))

  it.each([0, 1] as const)("rmsnorm with offset %i", (offset) =>
    withEngine(1, (e) => {
      const m = mesh([1, 1])
      gradcheck(
        e,
        m,
        { x: { shape: [3, 2, 8], data: randArray(48) }, w: { shape: [8], data: randArray(8) } },
        (v) => rmsnorm(v.x!, v.w!, 1e-5, offset),
      )
    }),
  )

  it("rope", () =>
    withEngine(1, (e) => {
      const m = mesh([1, 1])
      const pos = Effect.runSync(
        fromHost(e, Int32Array.from([0, 1, 2, 5, 3, 0]), [2, 3], "int32", new NamedSharding(m, P())),
      )
      const inv = Effect.runSync(
        fromHost(e, Float64Array.from([1, 0.1, 0.01]), [3], "float64", new NamedSharding(m, P())),
      )
      gradcheck(e, m, { x: { shape: [2, 3, 2, 6], data: randArray(72) } }, (v) => rope(v.x!, pos, inv, 1.25))
    }))

  it.each([
    ["causal GQA", { causal: true }],
    ["sliding window", { causal: true, window: 3 }],
    ["key mask with a fully masked row", { causal: true, mask: true }],
    ["bidirectional", { causal: false }],
  ] as const)("attention: %s", (_, o) =>
    withEngine(1, (e) => {
      const m = mesh([1, 1])
      const B = 2
      const T = 5
      const mask = Uint8Array.from({ length: B * T }, (_, i) => (i === 0 || i === 7 ? 0 : 1))
      const keyMask =
        "mask" in o
          ? Effect.runSync(fromHost(e, mask, [B, T], "uint8", new NamedSharding(m, P())))
          : undefined
      gradcheck(
        e,
        m,
        {
          q: { shape: [B, T, 4, 4], data: randArray(B * T * 16) },
          k: { shape: [B, T, 2, 4], data: randArray(B * T * 8) },
          v: { shape: [B, T, 2, 4], data: randArray(B * T * 8) },
        },
        (x) =>
          attention(x.q!, x.k!, x.v!, {
            causal: o.causal,
            ...("window" in o ? { window: o.window } : {}),
            ...(keyMask ? { keyMask } : {}),
          }),
        8,
      )
    }),
  )

  it.each(["silu", "gelu_tanh"] as const)("glu (%s)", (act) =>
    withEngine(1, (e) => {
      const m = mesh([1, 1])
      gradcheck(
        e,
        m,
        { g: { shape: [3, 7], data: randArray(21, 2) }, u: { shape: [3, 7], data: randArray(21) } },
        (v) => glu(v.g!, v.u!, act),
      )
    }),
  )

  it("fused cross-entropy with ignored targets", () =>
    withEngine(1, (e) => {
      const m = mesh([1, 1])
      const targets = Effect.runSync(
        fromHost(e, Int32Array.from([3, -100, 0, 6, 2, -100]), [2, 3], "int32", new NamedSharding(m, P())),
      )
      const rowScale = Effect.runSync(
        fromHost(e, new Float64Array(6).fill(0.25), [2, 3], "float64", new NamedSharding(m, P())),
      )
      gradcheck(
        e,
        m,
        { h: { shape: [2, 3, 5], data: randArray(30) }, w: { shape: [7, 5], data: randArray(35) } },
        (v) => crossEntropyLoss(v.h!, v.w!, targets, rowScale),
      )
    }))

  it("heads split and merge, and sharded ops with collectives on a 2×2 mesh", () =>
    withEngine(4, (e) => {
      const m = mesh([2, 2])
      // FSDP + tensor parallel: the gather, reduce-scatter and all-reduce transposes are checked too.
      gradcheck(
        e,
        m,
        {
          x: { shape: [4, 3, 8], data: randArray(96), spec: P("data") },
          w1: { shape: [8, 8], data: randArray(64), spec: P("model", "data") },
          w2: { shape: [8, 8], data: randArray(64), spec: P("data", "model") },
        },
        (v) => linear(mergeHeads(splitHeads(linear(v.x!, v.w1!), 4)), v.w2!),
      )
      const targets = Effect.runSync(
        fromHost(
          e,
          Int32Array.from({ length: 12 }, (_, i) => (i % 5 === 0 ? -100 : i % 8)),
          [4, 3],
          "int32",
          new NamedSharding(m, P("data")),
        ),
      )
      const rowScale = Effect.runSync(
        fromHost(e, new Float64Array(12).fill(0.1), [4, 3], "float64", new NamedSharding(m, P("data"))),
      )
      // The vocabulary-parallel loss: statistics combined over `model`.
      gradcheck(
        e,
        m,
        {
          h: { shape: [4, 3, 8], data: randArray(96), spec: P("data") },
          w: { shape: [8, 8], data: randArray(64), spec: P("model", "data") },
        },
        (v) => crossEntropyLoss(v.h!, v.w!, targets, rowScale),
      )
    }))
})
