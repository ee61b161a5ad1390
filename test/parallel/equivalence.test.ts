/**
 * Any partition rules over any mesh train exactly like one device: for meshes 1×1, 4×1, 1×4,
 * 2×2 and 2×4 and the rule sets replicated (pure data parallel), FSDP only, tensor parallel only
 * and Magix's default, the loss at every step and the parameters after three AdamW steps equal
 * the single-device run within 1e-5 (relative), for the Llama, Mistral and Gemma fixtures.
 * The first step's gradients are compared too, within 2e-6: they differ from one device only by
 * float32 summation order. (AdamW normalises each gradient entry, so at large learning rates the
 * rounding of tiny entries shows up in the parameters; 1e-3 is a fine-tuning rate.)
 */
import { describe, expect, it } from "vitest"
import { relErr } from "../helpers.ts"
import { meshes, ruleSets, train } from "./equivalenceRun.ts"

describe.each(["llama", "mistral", "gemma"] as const)(
  "%s: every mesh and rule set trains like one device",
  (family) => {
    it("losses at every step and parameters after three AdamW steps", async () => {
      const reference = await train(family, [1, 1], (r) => r)
      expect(reference.losses[2]!).toBeLessThan(reference.losses[0]!)
      expect(reference.traces).toBe(1)
      for (const shape of meshes.slice(1)) {
        for (const [name, rules] of Object.entries(ruleSets)) {
          const run = await train(family, shape, rules)
          const where = `${family} ${shape.join("x")} ${name}`
          for (let i = 0; i < 3; i++)
            expect(relErr([run.losses[i]!], [reference.losses[i]!]), `${where} loss ${i}`).toBeLessThan(1e-5)
          for (const [p, g] of Object.entries(reference.grads))
            expect(relErr(run.grads[p]!, g), `${where} d${p}`).toBeLessThan(2e-6)
          for (const [p, v] of Object.entries(reference.params))
            expect(relErr(run.params[p]!, v), `${where} ${p}`).toBeLessThan(1e-5)
        }
      }
    })
  },
)
