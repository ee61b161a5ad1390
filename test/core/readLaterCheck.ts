/** The readLater check the CPU (test/core/readLater.test.ts) and CUDA (test/gpu/cuda.test.ts) suites run. */
import { expect } from "vitest"
import type { Backend } from "../../src/core/backend.ts"
import { NativeInvariantViolation } from "../../src/core/errors.ts"

/** The value is the one at the start of the read, whatever is written after; a ticket finishes once. */
export const checkReadLater = (b: Backend) => {
  const x = b.alloc(0, 8)
  b.write(x, 0, new Float32Array([1, 2]))
  const first = b.readLater!(x, 4, 4)
  b.write(x, 0, new Float32Array([3, 4]))
  const second = b.readLater!(x, 0, 8)
  expect(Array.from(new Float32Array(first().slice().buffer))).toEqual([2])
  expect(Array.from(new Float32Array(second().slice().buffer))).toEqual([3, 4])
  expect(() => first()).toThrow(NativeInvariantViolation)
  expect(() => b.readLater!(x, 4, 8)).toThrow(/leaves a buffer of 8 bytes/)
  b.free(x)
}
