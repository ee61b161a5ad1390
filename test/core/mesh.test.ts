import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { makeMesh } from "../../src/core/mesh.ts"

const devices = (n: number) => Array.from({ length: n }, (_, i) => i)
const run = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(e)
const fail = <A, E>(e: Effect.Effect<A, E>) => Effect.runPromise(Effect.flip(e))

describe("makeMesh", () => {
  it("lays devices out row-major with named axes", async () => {
    const mesh = await run(makeMesh(devices(8), [2, 4], ["data", "model"]))
    expect(mesh.shape).toEqual([2, 4])
    expect(mesh.coords(5)).toEqual([1, 1])
    expect(mesh.position([1, 3])).toBe(7)
    expect(mesh.axisSize("model")).toBe(4)
    expect(mesh.toString()).toBe("Mesh(data=2, model=4)")
  })

  it("resolves a single -1 to the remaining devices", async () => {
    expect((await run(makeMesh(devices(8), [2, -1]))).shape).toEqual([2, 4])
    expect((await run(makeMesh(devices(8), [-1, 1]))).shape).toEqual([8, 1])
    expect((await run(makeMesh(devices(6), [1, -1, 2], ["a", "b", "c"]))).shape).toEqual([1, 3, 2])
  })

  it("rejects two -1s, a wrong product, an indivisible -1 and zero sizes", async () => {
    const two = await fail(makeMesh(devices(8), [-1, -1]))
    expect(two._tag).toBe("InvalidMeshShape")
    expect(two.message).toContain("only one -1")
    const product = await fail(makeMesh(devices(8), [2, 2]))
    expect(product._tag).toBe("InvalidMeshShape")
    expect(product.message).toContain("multiply to 4")
    expect((await fail(makeMesh(devices(6), [4, -1])))._tag).toBe("InvalidMeshShape")
    expect((await fail(makeMesh(devices(4), [0, 4])))._tag).toBe("InvalidMeshShape")
  })

  it("rejects duplicate names and a rank mismatch", async () => {
    const dup = await fail(makeMesh(devices(4), [2, 2], ["data", "data"]))
    expect(dup._tag).toBe("DuplicateMeshAxis")
    const rank = await fail(makeMesh(devices(4), [4], ["data", "model"]))
    expect(rank._tag).toBe("MeshRankMismatch")
  })

  it("groups positions for collectives over one or several axes", async () => {
    const mesh = await run(makeMesh(devices(8), [2, 4]))
    expect(mesh.groups(["model"])).toEqual([
      [0, 1, 2, 3],
      [4, 5, 6, 7],
    ])
    expect(mesh.groups(["data"])).toEqual([
      [0, 4],
      [1, 5],
      [2, 6],
      [3, 7],
    ])
    expect(mesh.groups(["data", "model"])).toEqual([[0, 1, 2, 3, 4, 5, 6, 7]])
    // (model, data) order: model most significant
    expect(mesh.groups(["model", "data"])).toEqual([[0, 4, 1, 5, 2, 6, 3, 7]])
  })
})
