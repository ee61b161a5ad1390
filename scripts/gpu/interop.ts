/**
 * Readers this project did not write, run on the GPU host (issue 6, points 1 and 6): for each tiny
 * fixture family this writes, under the directory given,
 *   <family>/ckpt/1/...   a Magix checkpoint saved from a 2×2 CPU mesh with the default rules
 *                         (so arrays have several chunks): `params` in float32 and `bf16` in bfloat16
 *   <family>/hf-float32, <family>/hf-bfloat16   `saveHuggingFace` exports
 *   <family>/magix.json   Magix's own logits on the fixture's reference batch
 * and scripts/gpu/interop.py then reads the checkpoint with tensorstore and loads the exports with
 * transformers.
 *
 *   npx tsx scripts/gpu/interop.ts /tmp/interop && python scripts/gpu/interop.py /tmp/interop
 */
import { writeFileSync } from "node:fs"
import { join, resolve } from "node:path"
import { Effect } from "effect"
import { placeBatch } from "../../src/core/models/batch.ts"
import { modelClassFor, type Params } from "../../src/core/models/decoder.ts"
import { castTo } from "../../src/core/ops/elementwise.ts"
import { toHost } from "../../src/core/shardedArray.ts"
import { Checkpointer } from "../../src/layers/Checkpointer.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { saveHuggingFace } from "../../src/layers/exportModel.ts"
import { loadModelHub } from "../../src/layers/loadModel.ts"
import { fixtures, mesh, readReference, referenceBatch, runCpu } from "../../test/helpers.ts"

const out = resolve(process.argv[2] ?? "/tmp/interop")
const families = ["llama", "mistral", "gemma"] as const

for (const family of families) {
  const dir = join(out, family)
  const summary = await runCpu(
    4,
    Effect.gen(function* () {
      const { engine } = yield* Devices
      const m = mesh([2, 2])
      const Model = modelClassFor(family)
      const { model, params } = yield* loadModelHub(Model, family, Model.partitionRules, m)
      const bf16 = engine.tidy(() =>
        Object.fromEntries(Object.entries(params).map(([k, a]) => [k, castTo(a, "bfloat16")])),
      ) as Params
      yield* Effect.gen(function* () {
        const ckpt = yield* Checkpointer
        yield* ckpt.save(1, { params, bf16 })
        yield* ckpt.wait
      }).pipe(Effect.provide(Checkpointer.layer({ directory: join(dir, "ckpt") })))
      yield* saveHuggingFace(model, params, join(dir, "hf-float32"), { dtype: "float32" })
      yield* saveHuggingFace(model, params, join(dir, "hf-bfloat16"), { dtype: "bfloat16" })
      const ref = yield* readReference(join(fixtures, "hf", family, "reference.safetensors"))
      const { batch } = yield* placeBatch(engine, m, referenceBatch(ref))
      const logits = engine.tidy(() => toHost(model.logits(params, model.forward(params, batch))))
      const arrays = Object.fromEntries(
        Object.entries(params).map(([k, a]) => [k, { shape: a.shape, spec: a.sharding.spec.toString() }]),
      )
      return { logits: Array.from(logits as Float32Array), shape: [...ref.logits!.shape], arrays }
    }),
  )
  writeFileSync(join(dir, "magix.json"), JSON.stringify(summary))
  console.log(`${family}: checkpoint, exports and logits written to ${dir}`)
}
