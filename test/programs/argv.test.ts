/** The original scripts' spellings: underscores in flag names, and mesh shapes as several values. */
import { describe, expect, it } from "vitest"
import { normalizeArgv, parseIntList } from "../../programs/argv.ts"

describe("normalizeArgv", () => {
  it("reads --mesh-shape as spaces, commas or both, and leaves the next flag alone", () => {
    for (const spelling of [["2", "-1"], ["2,-1"], ["2,", "-1"]])
      expect(normalizeArgv(["train", "--mesh-shape", ...spelling, "--max-steps", "3"])).toEqual([
        "train",
        "--mesh-shape",
        "2,-1",
        "--max-steps",
        "3",
      ])
    expect(parseIntList("2,-1")).toEqual([2, -1])
  })

  it("turns --model_type into --model-type, with or without =value", () => {
    expect(normalizeArgv(["--model_type", "llama", "--batch_size=4"])).toEqual([
      "--model-type",
      "llama",
      "--batch-size=4",
    ])
  })
})
