/**
 * Parity with Hugging Face transformers (5.17, float64 references stored as float32): logits and
 * loss within 1e-5, every parameter's gradient within 1e-4 (test/fixtures/hf, made by
 * scripts/fixtures/make_fixtures.py).
 */
import { join } from "node:path"
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { valueAndGrad } from "../../src/core/autodiff.ts"
import { placeBatch } from "../../src/core/models/batch.ts"
import { modelClassFor, type Params } from "../../src/core/models/decoder.ts"
import { shardToHost, toHost } from "../../src/core/shardedArray.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { families, fixtures, mesh, readReference, referenceBatch, relErr, runCpu } from "../helpers.ts"

const modelTypeOf = (family: string) =>
  (family === "llama3" ? "llama" : family) as "llama" | "mistral" | "gemma"

describe.each(families)("%s matches transformers", (family) => {
  it("logits, loss and every gradient", async () => {
    const result = await runCpu(
      1,
      Effect.gen(function* () {
        const { engine } = yield* Devices
        const m = mesh([1, 1])
        const Model = modelClassFor(modelTypeOf(family))
        const { model, params } = yield* loadModelHub(Model, family, Model.partitionRules, m)
        const ref = yield* readReference(join(fixtures, "hf", family, "reference.safetensors"))
        const { batch } = yield* placeBatch(engine, m, referenceBatch(ref))
        const logits = engine.tidy(() => toHost(model.logits(params, model.forward(params, batch))))
        const { value, grads } = valueAndGrad((p: Params) => model.loss(p, batch))(params)
        const gradErrors: Record<string, number> = {}
        for (const [name, g] of Object.entries(grads))
          gradErrors[name] = relErr(toHost(g) as Float32Array, ref[`grad.${name}`]!.data)
        return {
          logits: relErr(logits as Float32Array, ref.logits!.data),
          loss: relErr([Number(shardToHost(value, 0)[0])], ref.loss!.data),
          gradErrors,
          gradCount: Object.keys(grads).length,
          refGrads: Object.keys(ref).filter((k) => k.startsWith("grad.")).length,
        }
      }),
    )
    expect(result.logits).toBeLessThan(1e-5)
    expect(result.loss).toBeLessThan(1e-5)
    expect(result.gradCount).toBe(result.refGrads)
    for (const [name, err] of Object.entries(result.gradErrors)) expect(err, name).toBeLessThan(1e-4)
  })
})
