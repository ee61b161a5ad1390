/**
 * Trees of values (parameters, gradients, optimizer state): nested records and arrays whose
 * leaves are picked out by a predicate. A leaf's path joins its keys with "." so a flat record
 * of Hugging Face names ("model.layers.0.mlp.up_proj.weight") keeps those names as paths.
 */
export type Tree<T> = T | ReadonlyArray<Tree<T>> | { readonly [key: string]: Tree<T> }

export type IsLeaf<T> = (x: unknown) => x is T

const joinPath = (prefix: string, key: string) => (prefix === "" ? key : `${prefix}.${key}`)

/** Every leaf with its path, in key order. */
export const flattenWithPath = <T>(tree: Tree<T>, isLeaf: IsLeaf<T>, prefix = ""): Array<[string, T]> => {
  if (isLeaf(tree)) return [[prefix, tree]]
  if (Array.isArray(tree))
    return tree.flatMap((t, i) => flattenWithPath(t as Tree<T>, isLeaf, joinPath(prefix, String(i))))
  if (tree !== null && typeof tree === "object")
    return Object.entries(tree as Record<string, Tree<T>>).flatMap(([k, v]) =>
      flattenWithPath(v, isLeaf, joinPath(prefix, k)),
    )
  return []
}

export const leaves = <T>(tree: Tree<T>, isLeaf: IsLeaf<T>): T[] =>
  flattenWithPath(tree, isLeaf).map(([, v]) => v)

/** The same structure with each leaf replaced by f(path, leaf). */
export const mapWithPath = <T, U>(
  tree: Tree<T>,
  isLeaf: IsLeaf<T>,
  f: (path: string, leaf: T) => U,
  prefix = "",
): Tree<U> => {
  if (isLeaf(tree)) return f(prefix, tree)
  if (Array.isArray(tree))
    return tree.map((t, i) => mapWithPath(t as Tree<T>, isLeaf, f, joinPath(prefix, String(i))))
  if (tree !== null && typeof tree === "object") {
    const out: Record<string, Tree<U>> = {}
    for (const [k, v] of Object.entries(tree as Record<string, Tree<T>>))
      out[k] = mapWithPath(v, isLeaf, f, joinPath(prefix, k))
    return out
  }
  return tree as unknown as Tree<U>
}
