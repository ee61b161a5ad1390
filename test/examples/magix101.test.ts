import { Effect } from "effect"
import { expect, it } from "vitest"
import { magix101 } from "../../examples/magix101.ts"

it("the Magix 101 walkthrough in the README runs and its loss falls", async () => {
  const losses = await Effect.runPromise(magix101)
  expect(losses).toHaveLength(5)
  expect(losses[4]!).toBeLessThan(losses[0]!)
})
