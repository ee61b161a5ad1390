import { Effect } from "effect"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { type Mesh, makeMesh } from "../../src/core/mesh.ts"
import { duplicateOver, matchRule, specFor, treeShardings } from "../../src/core/partitionRules.ts"
import { NamedSharding, P, PartitionSpec } from "../../src/core/sharding.ts"

const mesh = (shape: number[], names = ["data", "model"]) =>
  Effect.runSync(
    makeMesh(
      Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => i),
      shape,
      names,
    ),
  )
const fail = <A, E>(e: Effect.Effect<A, E>) => Effect.runSync(Effect.flip(e))

describe("NamedSharding", () => {
  it("gives each device its slice (JAX's order for several axes)", () => {
    const m = mesh([2, 2])
    const s = new NamedSharding(m, P("data", "model"))
    expect(s.slices([4, 6])).toEqual([
      { offsets: [0, 0], shape: [2, 3] },
      { offsets: [0, 3], shape: [2, 3] },
      { offsets: [2, 0], shape: [2, 3] },
      { offsets: [2, 3], shape: [2, 3] },
    ])
    const both = new NamedSharding(m, P(["model", "data"], null))
    // model most significant: position (data=1, model=0) holds block 1
    expect(both.slice(m.position([1, 0]), [8, 3]).offsets).toEqual([2, 0])
    expect(both.slice(m.position([0, 1]), [8, 3]).offsets).toEqual([4, 0])
    expect(new NamedSharding(m, P()).slice(3, [5, 7])).toEqual({ offsets: [0, 0], shape: [5, 7] })
  })

  it("reports replication", () => {
    const m = mesh([2, 4])
    expect(new NamedSharding(m, P("data")).replication).toBe(4)
    expect(new NamedSharding(m, P("data", "model")).replication).toBe(1)
    expect(new NamedSharding(m, P()).replicatedAxes).toEqual(["data", "model"])
  })

  it("names the parameter in every error", () => {
    const m = mesh([2, 2])
    const unknown = fail(new NamedSharding(m, P("tensor")).validate([4], "w"))
    expect(unknown._tag).toBe("UnknownMeshAxis")
    expect(unknown.message).toContain("w:")
    const twice = fail(new NamedSharding(m, P("data", "data")).validate([4, 4], "w"))
    expect(twice._tag).toBe("AxisUsedTwice")
    const indiv = fail(
      new NamedSharding(m, P("data", "model")).validate([4, 3], "model.layers.0.mlp.up_proj.weight"),
    )
    expect(indiv._tag).toBe("IndivisibleDimension")
    expect(indiv.message).toContain("model.layers.0.mlp.up_proj.weight")
    expect(indiv.message).toContain("dimension 1 has size 3")
    const rank = fail(new NamedSharding(m, P("data", "model")).validate([4], "bias"))
    expect(rank._tag).toBe("SpecRankMismatch")
  })

  it("slices tile every array exactly once per replica (property)", () => {
    const arb = fc
      .record({
        meshShape: fc.array(fc.integer({ min: 1, max: 3 }), { minLength: 1, maxLength: 3 }),
        rank: fc.integer({ min: 0, max: 3 }),
        seed: fc.integer(),
      })
      .chain(({ meshShape, rank }) => {
        const names = meshShape.map((_, i) => `a${i}`)
        // Each axis goes to at most one dimension (or none); a dimension may take several.
        return fc
          .record({
            placement: fc.array(fc.integer({ min: -1, max: rank - 1 }), {
              minLength: names.length,
              maxLength: names.length,
            }),
            order: fc.shuffledSubarray(names, { minLength: names.length, maxLength: names.length }),
            multipliers: fc.array(fc.integer({ min: 1, max: 3 }), { minLength: rank, maxLength: rank }),
          })
          .map((r) => ({ meshShape, names, rank, ...r }))
      })
    fc.assert(
      fc.property(arb, ({ meshShape, names, rank, placement, order, multipliers }) => {
        const m: Mesh = mesh(meshShape, names)
        const entries: string[][] = Array.from({ length: rank }, () => [])
        for (const axis of order) {
          const d = placement[names.indexOf(axis)]!
          if (d >= 0) entries[d]!.push(axis)
        }
        const spec = new PartitionSpec(entries)
        const shape = entries.map((axes, d) => m.axesSize(axes) * multipliers[d]!)
        const sharding = new NamedSharding(m, spec)
        Effect.runSync(sharding.validate(shape))
        const total = shape.reduce((a, b) => a * b, 1)
        const counts = new Uint16Array(total)
        const strides = shape.map((_, i) => shape.slice(i + 1).reduce((a, b) => a * b, 1))
        for (const s of sharding.slices(shape)) {
          const visit = (d: number, base: number) => {
            if (d === rank) {
              counts[base]! += 1
              return
            }
            for (let i = 0; i < s.shape[d]!; i++) visit(d + 1, base + (s.offsets[d]! + i) * strides[d]!)
          }
          visit(0, 0)
        }
        // Every element is held by exactly `replication` devices.
        for (const c of counts) expect(c).toBe(sharding.replication)
      }),
      { numRuns: 300 },
    )
  })
})

describe("partition rules", () => {
  const rules = [
    ["embed_tokens", P("data", "model")],
    ["(q|k|v)_proj", P("model", "data")],
    [/o_proj/, P("data", "model")],
  ] as const

  it("takes the first rule found in the path; scalars and unmatched paths are replicated", () => {
    expect(specFor(rules, "model.embed_tokens.weight", [8, 4]).toString()).toBe("P(data, model)")
    expect(specFor(rules, "model.layers.3.self_attn.k_proj.weight", [8, 4]).toString()).toBe("P(model, data)")
    expect(specFor(rules, "model.layers.3.self_attn.o_proj.weight", [8, 4]).toString()).toBe("P(data, model)")
    expect(specFor(rules, "model.norm.weight", [4]).toString()).toBe("P()")
    expect(specFor(rules, "embed_tokens.count", []).toString()).toBe("P()")
    expect(matchRule(rules, "mu.model.layers.0.self_attn.q_proj.weight")?.index).toBe(1)
  })

  it("validates a whole tree against a mesh, naming the parameter", () => {
    const m = mesh([2, 2])
    const ok = Effect.runSync(
      treeShardings(
        rules,
        { "model.embed_tokens.weight": { shape: [8, 4] }, "model.norm.weight": { shape: [4] } },
        m,
      ),
    ) as Record<string, NamedSharding>
    expect(ok["model.embed_tokens.weight"]!.spec.toString()).toBe("P(data, model)")
    const bad = fail(treeShardings(rules, { "model.layers.0.self_attn.q_proj.weight": { shape: [3, 4] } }, m))
    expect(bad._tag).toBe("IndivisibleDimension")
    expect(bad.message).toContain("q_proj")
  })

  it("duplicateOver removes axes from every spec", () => {
    const specs = { a: P("data", "model"), b: { c: P(["data", "model"], null) } }
    const out = duplicateOver(specs, "data") as { a: PartitionSpec; b: { c: PartitionSpec } }
    expect(out.a.toString()).toBe("P(None, model)")
    expect(out.b.c.toString()).toBe("P(model, None)")
  })
})
