/**
 * The equivalence suite on the GPUs present, over NCCL: for every mesh that fits the GPUs (1×1
 * always; 2×1, 1×2, 2×2, 2×4 where there are enough) and every rule set, a CUDA run's first
 * gradients, losses over three AdamW steps and final parameters equal the CPU backend's
 * one-device run. float32 on both sides; the bounds are looser than the CPU suite's because
 * cuBLASLt and the CUDA kernels sum in other orders and use fast exponentials.
 */
import { join } from "node:path"
import { Effect, Layer } from "effect"
import { describe, expect, it } from "vitest"
import { CudaRuntime, gpuAvailable } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { loadNative } from "../../src/native/index.ts"
import { fixtures, relErr } from "../helpers.ts"
import { type Runner, ruleSets, train } from "../parallel/equivalenceRun.ts"

const gpus = gpuAvailable() ? loadNative().cudaProbe().devices : 0
const onCuda: Runner = (_devices, effect) =>
  Effect.runPromise(
    effect.pipe(
      Effect.scoped,
      Effect.provide(Layer.mergeAll(CudaRuntime, Hub.localDirectory(join(fixtures, "hf")))),
    ),
  )
const shapes: Array<[number, number]> = (
  [
    [1, 1],
    [2, 1],
    [1, 2],
    [2, 2],
    [2, 4],
  ] as Array<[number, number]>
).filter(([a, b]) => a * b <= gpus)

describe.skipIf(gpus === 0).each(["llama", "mistral", "gemma"] as const)(
  "%s on CUDA meshes trains like the CPU backend",
  (family) => {
    it("gradients, losses and parameters after three AdamW steps", async () => {
      const reference = await train(family, [1, 1], (r) => r)
      for (const shape of shapes)
        for (const [name, rules] of Object.entries(ruleSets)) {
          const run = await train(family, shape, rules, onCuda)
          const where = `${family} cuda ${shape.join("x")} ${name}`
          let worst = { grad: 0, param: 0, loss: 0 }
          for (const [p, g] of Object.entries(reference.grads)) {
            const e = relErr(run.grads[p]!, g)
            worst = { ...worst, grad: Math.max(worst.grad, e) }
            expect(e, `${where} d${p}`).toBeLessThan(1e-4)
          }
          for (let i = 0; i < 3; i++) {
            const e = relErr([run.losses[i]!], [reference.losses[i]!])
            worst = { ...worst, loss: Math.max(worst.loss, e) }
            expect(e, `${where} loss ${i}`).toBeLessThan(2e-5)
          }
          for (const [p, v] of Object.entries(reference.params)) {
            const e = relErr(run.params[p]!, v)
            worst = { ...worst, param: Math.max(worst.param, e) }
            expect(e, `${where} ${p}`).toBeLessThan(2e-5)
          }
          console.log(`${where}: worst relative error ${JSON.stringify(worst)}`)
        }
    }, 300_000)
  },
)
