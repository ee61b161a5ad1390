/**
 * Partition rules: an ordered list of [regex, spec]. A parameter takes the spec of the first
 * rule whose regex is found anywhere in its path (Python's re.search); scalars and parameters
 * no rule matches are replicated.
 */
import { Effect } from "effect"
import type { Mesh } from "./mesh.ts"
import type { Shape } from "./shape.ts"
import { NamedSharding, PartitionSpec, type ShardingError } from "./sharding.ts"
import { flattenWithPath, type IsLeaf, mapWithPath, type Tree } from "./tree.ts"

export type PartitionRule = readonly [pattern: string | RegExp, spec: PartitionSpec]
export type PartitionRules = ReadonlyArray<PartitionRule>

const replicated = new PartitionSpec([])

// A /g or /y regex would carry lastIndex between calls; rules are matched statelessly.
const toRegExp = (p: string | RegExp): RegExp =>
  typeof p === "string"
    ? new RegExp(p)
    : p.global || p.sticky
      ? new RegExp(p.source, p.flags.replace(/[gy]/g, ""))
      : p

/** The rule (index and spec) that applies to a parameter path, or undefined when none does. */
export const matchRule = (
  rules: PartitionRules,
  path: string,
): { index: number; spec: PartitionSpec } | undefined => {
  for (let i = 0; i < rules.length; i++) {
    const [pattern, spec] = rules[i]!
    if (toRegExp(pattern).test(path)) return { index: i, spec }
  }
  return undefined
}

/** The spec of one parameter: first matching rule, replicated for scalars and unmatched paths. */
export const specFor = (rules: PartitionRules, path: string, shape: Shape): PartitionSpec => {
  if (shape.length === 0) return replicated
  return matchRule(rules, path)?.spec ?? replicated
}

/** Anything with a shape: arrays, or plain `{ shape }` descriptions. */
export interface Shaped {
  readonly shape: Shape
}
const isShaped: IsLeaf<Shaped> = (x): x is Shaped =>
  typeof x === "object" && x !== null && Array.isArray((x as { shape?: unknown }).shape)

/** Specs for every leaf of a tree (Magix's `get_sharding` over a tree), unvalidated. */
export const treeSpecs = <T extends Shaped>(rules: PartitionRules, tree: Tree<T>): Tree<PartitionSpec> =>
  mapWithPath(tree, isShaped as IsLeaf<T>, (path, leaf) => specFor(rules, path, leaf.shape))

/** Validated shardings for every leaf of a tree on a mesh. */
export const treeShardings = <T extends Shaped>(
  rules: PartitionRules,
  tree: Tree<T>,
  mesh: Mesh,
): Effect.Effect<Tree<NamedSharding>, ShardingError> =>
  Effect.gen(function* () {
    for (const [path, leaf] of flattenWithPath(tree, isShaped as IsLeaf<T>)) {
      yield* new NamedSharding(mesh, specFor(rules, path, leaf.shape)).validate(leaf.shape, path)
    }
    return mapWithPath(
      tree,
      isShaped as IsLeaf<T>,
      (path, leaf) => new NamedSharding(mesh, specFor(rules, path, leaf.shape)),
    )
  })

const isSpec: IsLeaf<PartitionSpec> = (x): x is PartitionSpec => x instanceof PartitionSpec

/** The specs with the given mesh axes removed everywhere: replicated over those axes. */
export const duplicateOver = (specs: Tree<PartitionSpec>, ...axes: string[]): Tree<PartitionSpec> =>
  mapWithPath(specs, isSpec, (_, s) => s.without(axes))

/** Rules with the given axes removed from every spec (e.g. pure tensor parallelism from the defaults). */
export const rulesWithout = (rules: PartitionRules, ...axes: string[]): PartitionRules =>
  rules.map(([p, s]) => [p, s.without(axes)] as const)
