/**
 * Fuzzing config.json: mutated configs of every fixture family parse to a model or fail with a
 * typed error; a config that parses builds its model, counts its parameters and writes back to
 * JSON that parses to the same config.
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { Effect, Exit } from "effect"
import fc from "fast-check"
import { afterAll, describe, expect, it } from "vitest"
import {
  configToJson,
  parameterCount,
  parameterShapes,
  parseConfig,
  parseConfigText,
} from "../../src/core/config.ts"
import { makeModel, modelClassFor } from "../../src/core/models/decoder.ts"
import { families, fixtures } from "../helpers.ts"
import { count, fuzzParams, mutatedJsonText, reportCounts, settle } from "./fuzz.ts"

afterAll(reportCounts)

const configTags = ["InvalidConfig", "UnsupportedConfig"]
const seeds = [
  ...families.map((f) => readFileSync(join(fixtures, "hf", f, "config.json"), "utf8")),
  readFileSync(join(import.meta.dirname, "..", "..", "examples", "tiny", "config.json"), "utf8"),
]

describe("config.json", () => {
  it("mutated configs of every family: a model or a typed error; a model round-trips through JSON", async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...seeds).chain(mutatedJsonText), async (text) => {
        count("config.json")
        const exit = await settle(parseConfigText(text, "fuzz/config.json"), configTags)
        if (Exit.isFailure(exit)) return
        const config = exit.value
        const model = Effect.runSync(makeModel(modelClassFor(config.modelType), config))
        expect(model.config).toBe(config)
        for (const [, shape] of parameterShapes(config))
          for (const d of shape) expect(Number.isSafeInteger(d)).toBe(true)
        expect(Number.isFinite(parameterCount(config))).toBe(true)
        const back = await settle(parseConfig(JSON.parse(JSON.stringify(configToJson(config)))), configTags)
        expect(Exit.isSuccess(back) ? back.value : undefined).toEqual(config)
      }),
      fuzzParams(600),
    )
  })

  it("random JSON values and random text", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.json(),
          fc.string(),
          fc.jsonValue().map((v) =>
            JSON.stringify({
              model_type: "llama",
              ...(typeof v === "object" && v !== null && !Array.isArray(v) ? v : { v }),
            }),
          ),
        ),
        async (text) => {
          count("config.json")
          await settle(parseConfigText(text), configTags)
        },
      ),
      fuzzParams(300),
    )
  })
})

describe("config.json regressions found by fuzzing", () => {
  it("a layer count or dimension no model has is InvalidConfig, not a loop until memory runs out", async () => {
    const llama = JSON.parse(seeds[0]!) as Record<string, unknown>
    for (const [field, value] of [
      ["num_hidden_layers", 2 ** 53 - 1],
      ["num_hidden_layers", 2 ** 31],
      ["vocab_size", 2 ** 40],
      ["intermediate_size", 2 ** 52],
    ] as const) {
      const exit = await settle(parseConfig({ ...llama, [field]: value }), configTags)
      expect(Exit.isFailure(exit), field).toBe(true)
    }
  })

  it('a dtype of "__proto__" or "constructor" is UnsupportedConfig, not Object\'s prototype', async () => {
    const llama = JSON.parse(seeds[0]!) as Record<string, unknown>
    for (const name of ["__proto__", "constructor", "toString"]) {
      const exit = await settle(parseConfig({ ...llama, torch_dtype: name, dtype: name }), configTags)
      expect(Exit.isFailure(exit), name).toBe(true)
    }
  })
})
