/**
 * The engine: a backend plus the bookkeeping of which arrays are alive. Arrays made inside
 * `tidy(fn)` are disposed when fn returns, except those reachable from its result (the pattern
 * of tf.tidy), so a step's temporaries never outlive the step.
 */

import type { Tape } from "./autodiff.ts"
import type { Backend, BufferId } from "./backend.ts"
import { type CollectiveBackend, Collectives } from "./collectives.ts"
import type { DType } from "./dtype.ts"
import type { ShardedArray } from "./shardedArray.ts"

/** Anything the engine can dispose at the end of a tidy block. */
export interface Disposable {
  dispose(): void
  readonly isDisposed: boolean
  /** Other disposables this one needs alive (a view's base). */
  dependencies?(): Iterable<Disposable>
}

export class Engine {
  // null marks an untracked region: arrays made there belong to no tidy block.
  private readonly arenas: Array<Set<Disposable> | null> = []
  readonly collectives: Collectives
  /** The tape ops record onto while a gradient is being taken (see autodiff.ts). */
  tape: Tape | undefined

  private current: Backend
  private readonly base: Backend
  /** Parameter → its kept copy in another dtype, while withCastShadows runs (see castShadow). */
  private castShadows: ReadonlyMap<ShardedArray, ShardedArray> | undefined

  constructor(backend: Backend, comms?: CollectiveBackend) {
    this.current = backend
    this.base = backend
    this.collectives = new Collectives(comms)
  }

  get backend(): Backend {
    return this.current
  }

  /** Runs fn with every backend call going to `backend` (jit records a step this way). */
  withBackend<T>(backend: Backend, fn: () => T): T {
    const prev = this.current
    this.current = backend
    try {
      return fn()
    } finally {
      this.current = prev
    }
  }

  /**
   * Runs fn with `shadows` (parameter → a copy of it in the compute dtype, kept equal to its cast
   * by whoever holds them: the optimizer writes them with the update, see train.ts) in effect:
   * castTo of such a parameter to the shadow's dtype reads the shadow instead of casting. Nested
   * calls replace the map for their duration.
   */
  withCastShadows<T>(shadows: ReadonlyMap<ShardedArray, ShardedArray>, fn: () => T): T {
    const prev = this.castShadows
    this.castShadows = shadows
    try {
      return fn()
    } finally {
      this.castShadows = prev
    }
  }

  /** The shadow of x in `dtype`, if withCastShadows gave one (same shape and sharding as x). */
  castShadow(x: ShardedArray, dtype: DType): ShardedArray | undefined {
    const s = this.castShadows?.get(x)
    return s && s.dtype === dtype && !s.isDisposed ? s : undefined
  }

  get platform(): "cpu" | "cuda" {
    return this.backend.platform
  }

  /** Records a new array in the innermost tidy block, if any. */
  track<T extends Disposable>(d: T): T {
    this.arenas[this.arenas.length - 1]?.add(d)
    return d
  }

  /**
   * Runs fn with no tidy block in effect: what it makes lives until disposed explicitly, by
   * whoever made it (a model's RoPE table, a KV cache). It also bypasses a jit recording: such a
   * cache made during a trace is one the step uses as it is, not a constant the trace owns (and
   * would free with it while its maker still holds it).
   */
  untracked<T>(fn: () => T): T {
    this.arenas.push(null)
    const prev = this.current
    this.current = this.base
    try {
      return fn()
    } finally {
      this.current = prev
      this.arenas.pop()
    }
  }

  /** Moves an array out of the innermost tidy block: it will outlive it. */
  keep<T extends Disposable>(d: T): T {
    const n = this.arenas.length
    if (n > 0) {
      this.arenas[n - 1]?.delete(d)
      this.arenas[n - 2]?.add(d)
    }
    return d
  }

  /**
   * Runs fn; disposes every array it created that its result does not reach. On failure
   * everything it created is disposed.
   */
  tidy<T>(fn: () => T, keepAlive?: (result: T) => Iterable<Disposable>): T {
    const arena = new Set<Disposable>()
    this.arenas.push(arena)
    let result: T
    try {
      result = fn()
    } catch (e) {
      this.arenas.pop()
      for (const d of arena) if (!d.isDisposed) d.dispose()
      throw e
    }
    this.arenas.pop()
    const kept = new Set<Disposable>()
    for (const d of keepAlive ? keepAlive(result) : reachable(result)) {
      kept.add(d)
      for (const dep of d.dependencies?.() ?? []) kept.add(dep)
    }
    const parent = this.arenas[this.arenas.length - 1]
    for (const d of arena) {
      if (kept.has(d)) parent?.add(d)
      else if (!d.isDisposed) d.dispose()
    }
    return result
  }

  allocate(device: number, bytes: number): BufferId {
    return this.backend.alloc(device, bytes)
  }
}

const isDisposable = (x: unknown): x is Disposable =>
  typeof x === "object" && x !== null && typeof (x as Disposable).dispose === "function" && "isDisposed" in x

/** Disposables found by walking arrays, maps and plain objects. */
export function* reachable(x: unknown, seen = new Set<unknown>()): Generator<Disposable> {
  if (x === null || typeof x !== "object" || seen.has(x)) return
  seen.add(x)
  if (isDisposable(x)) {
    yield x
    return
  }
  if (Array.isArray(x)) for (const v of x) yield* reachable(v, seen)
  else if (x instanceof Map) for (const v of x.values()) yield* reachable(v, seen)
  else if (Object.getPrototypeOf(x) === Object.prototype)
    for (const v of Object.values(x)) yield* reachable(v, seen)
}
