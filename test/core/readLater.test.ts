/** Reads in two halves (Backend.readLater) on the CPU backend; test/gpu/cuda.test.ts runs the same on CUDA. */
import { describe, it } from "vitest"
import { withEngine } from "../helpers.ts"
import { checkReadLater } from "./readLaterCheck.ts"

describe("readLater", () => {
  it("returns the value at the start, not what was written after", () =>
    withEngine(1, ({ backend }) => checkReadLater(backend)))
})
