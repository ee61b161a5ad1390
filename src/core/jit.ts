/**
 * `jit(step, { donate })`: the first call runs the step while recording every backend call it
 * makes (allocations, frees, ops, copies) into an op list; later calls replay that list with the
 * new inputs' buffers substituted, skipping all TypeScript work (sharding decisions, the autodiff
 * tape). Buffers the step allocates and frees are allocated and freed again on each replay (the
 * device allocator caches them); buffers it keeps (results) are fresh per call; buffers it keeps
 * but does not return (caches such as RoPE tables) are captured once and reused. With `graph`,
 * the replay itself is captured once and launched after (see JitOptions.graph).
 *
 * Donated inputs may be updated in place (the optimizer writes parameters and moments where they
 * are), so a step that returns them returns the same arrays. A replay needs inputs of the same
 * shapes, dtypes and shardings as the traced call; a different layout is traced anew.
 */
import type { Effect } from "effect"
import type { Backend, BufferId, GraphId, MemoryStats } from "./backend.ts"
import type { Engine } from "./engine.ts"
import { attempt, type DeviceError } from "./errors.ts"
import { type Lifetime, peakLive, planMemory } from "./memoryPlan.ts"
import { isShardedArray, ShardedArray } from "./shardedArray.ts"
import type { NamedSharding } from "./sharding.ts"

type Call =
  | { readonly kind: "alloc"; readonly slot: number; readonly device: number; readonly bytes: number }
  | { readonly kind: "free"; readonly slot: number }
  | {
      readonly kind: "exec"
      readonly op: string
      readonly slots: number[]
      readonly args: ReadonlyArray<number>
    }
  | {
      readonly kind: "copy"
      readonly dst: number
      readonly dstOffset: number
      readonly src: number
      readonly srcOffset: number
      readonly bytes: number
    }
  | { readonly kind: "write"; readonly slot: number; readonly offset: number; readonly data: Uint8Array }

/**
 * The buffers each op writes (indices into its buffer list): what jit checks donation against.
 * An op missing here is assumed to write every buffer.
 */
const writes = (op: string, n: number, args?: ReadonlyArray<number>): ReadonlyArray<number> => {
  const fixed: Record<string, number[]> = {
    matmul: [2],
    embedding_fwd: [2],
    embedding_bwd: [2],
    rmsnorm_fwd: [2, 3],
    rmsnorm_bwd: [4, 5],
    rope: [3],
    attention_fwd: [3, 4],
    attention_bwd: [6, 7, 8],
    glu_fwd: [2],
    glu_bwd: [3, 4],
    axpby: [1],
    add: [2],
    mul: [2],
    fill: [0],
    cast: [1],
    copy_box: [1],
    ce_fwd: [3, 4, 5],
    ce_rescale: [2],
    ce_lse: [2],
    ce_rowloss: [4],
    ce_bwd: [5, 6],
    ce_fused: [4, 5, 6, 7],
    sum: [1],
    sumsq: [1],
  }
  const f = fixed[op]
  if (f) return f
  const all = Array.from({ length: n }, (_, i) => i)
  if (op === "sumsq_multi") return [n - 1]
  if (op === "adamw") {
    // state, normSq, then p, g, m, v per tensor, then (with shadows) s per tensor: all but normSq and g.
    const count = args?.[1] ?? (n - 2) / 4
    return all.filter((i) => i === 0 || (i >= 2 && (i >= 2 + 4 * count || (i - 2) % 4 !== 1)))
  }
  if (op === "all_gather" || op === "reduce_scatter") return all.slice(n / 2)
  return all
}

export class DonationRequired extends Error {
  constructor(readonly argument: string) {
    super(`jit: the step updates ${argument} in place; list it in \`donate\``)
  }
}

/** Records what a traced step asks of the backend, mapping buffer ids to slots. */
class Recorder implements Backend {
  readonly calls: Call[] = []
  readonly slotOf = new Map<BufferId, number>()
  readonly traced: BufferId[] = []
  readonly freed = new Set<number>()
  /** Input slots of arguments that were not donated, with the argument's name. */
  readonly readOnly = new Map<number, string>()
  /** Slots of buffers the step used but neither received nor allocated (caches made earlier). */
  readonly external = new Set<number>()
  private allocating = false

  constructor(private readonly inner: Backend) {}

  get platform() {
    return this.inner.platform
  }
  get deviceCount() {
    return this.inner.deviceCount
  }
  slot(id: BufferId): number {
    let s = this.slotOf.get(id)
    if (s === undefined) {
      s = this.traced.length
      this.traced.push(id)
      this.slotOf.set(id, s)
      if (!this.allocating) this.external.add(s)
    }
    return s
  }
  /** Slots of the inputs, registered before the step runs (not external). */
  input(id: BufferId): number {
    this.allocating = true
    try {
      return this.slot(id)
    } finally {
      this.allocating = false
    }
  }
  alloc(device: number, bytes: number): BufferId {
    const id = this.inner.alloc(device, bytes)
    // A freed id can come back from the allocator: it starts a new slot.
    this.slotOf.delete(id)
    this.calls.push({ kind: "alloc", slot: this.input(id), device, bytes })
    return id
  }
  free(id: BufferId): void {
    const slot = this.slot(id)
    this.calls.push({ kind: "free", slot })
    this.freed.add(slot)
    this.inner.free(id)
  }
  write(id: BufferId, offset: number, data: ArrayBufferView): void {
    const copy = new Uint8Array(data.byteLength)
    copy.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength))
    this.calls.push({ kind: "write", slot: this.slot(id), offset, data: copy })
    this.inner.write(id, offset, data)
  }
  read(id: BufferId, _offset: number, length: number): Uint8Array {
    throw new Error(
      `jit: the step reads device memory (buffer ${id}, ${length} bytes) while it is traced; return the value instead`,
    )
  }
  copy(dst: BufferId, dstOffset: number, src: BufferId, srcOffset: number, bytes: number): void {
    this.calls.push({ kind: "copy", dst: this.slot(dst), dstOffset, src: this.slot(src), srcOffset, bytes })
    this.inner.copy(dst, dstOffset, src, srcOffset, bytes)
  }
  exec(op: string, buffers: ReadonlyArray<BufferId>, args: ReadonlyArray<number>): void {
    for (const i of writes(op, buffers.length, args)) {
      const owner = this.readOnly.get(this.slot(buffers[i]!))
      if (owner !== undefined) throw new DonationRequired(owner)
    }
    this.calls.push({ kind: "exec", op, slots: buffers.map((b) => this.slot(b)), args: [...args] })
    this.inner.exec(op, buffers, args)
  }
  stats(device: number): MemoryStats {
    return this.inner.stats(device)
  }
  resetPeak(device: number): void {
    this.inner.resetPeak(device)
  }
  synchronize(device: number): void {
    this.inner.synchronize(device)
  }
  hasOp(op: string): boolean {
    return this.inner.hasOp(op)
  }
  hostCopyBox(
    src: ArrayBufferView,
    dst: ArrayBufferView,
    elemSize: number,
    box: ReadonlyArray<number>,
  ): void {
    this.inner.hostCopyBox(src, dst, elemSize, box)
  }
}

const arraysOf = (x: unknown, out: ShardedArray[] = [], seen = new Set<unknown>()): ShardedArray[] => {
  if (x === null || typeof x !== "object" || seen.has(x)) return out
  seen.add(x)
  if (isShardedArray(x)) out.push(x)
  else if (Array.isArray(x)) for (const v of x) arraysOf(v, out, seen)
  else if (Object.getPrototypeOf(x) === Object.prototype)
    for (const v of Object.values(x)) arraysOf(v, out, seen)
  return out
}

/** Rebuilds a result tree, replacing each array by f(array). */
const rebuild = (x: unknown, f: (a: ShardedArray) => ShardedArray): unknown => {
  if (isShardedArray(x)) return f(x)
  if (Array.isArray(x)) return x.map((v) => rebuild(v, f))
  if (x !== null && typeof x === "object" && Object.getPrototypeOf(x) === Object.prototype)
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, rebuild(v, f)]))
  return x
}

const layoutKey = (args: ReadonlyArray<unknown>) =>
  arraysOf(args)
    .map(
      (a) =>
        `${a.shape.join("x")}:${a.dtype}:${a.sharding}:${a.partial.join("+")}:${a.mesh.devices.join(",")}`,
    )
    .join("|")

interface Trace {
  readonly key: string
  readonly calls: ReadonlyArray<Call>
  /** Slot of each input array's buffer at each position: inputSlots[i][p]. */
  readonly inputSlots: ReadonlyArray<ReadonlyArray<number>>
  /** Slots captured once and reused (allocated, never freed, not returned). */
  readonly captured: ReadonlyMap<number, BufferId>
  /** The traced result, as a template: arrays map to their slots per position. */
  readonly template: unknown
  readonly outputSlots: ReadonlyMap<ShardedArray, ReadonlyArray<number>>
  /** Result arrays that are input arrays (donated, updated in place): index of the input. */
  readonly outputInput: ReadonlyMap<ShardedArray, number>
}

/** A captured replay and what launching it needs besides the graph. */
interface GraphReplay {
  readonly graph: GraphId
  readonly backend: Backend
  /** Donated input slots and the caller's buffers the graph updates: later calls must pass them. */
  readonly fixed: ReadonlyMap<number, BufferId>
  /** Other input slots: the graph's own buffers, which each launch first copies the inputs into. */
  readonly copies: ReadonlyMap<number, { readonly buffer: BufferId; readonly bytes: number }>
  /** Result slots and the graph's buffers holding them after a launch. */
  readonly outputs: ReadonlyMap<number, BufferId>
  /** Buffers this graph owns (copies, constants, results), freed after it. */
  readonly buffers: ReadonlyArray<BufferId>
  readonly nodes: number
  readonly memory: ReadonlyArray<GraphMemory>
}

/** A graph's planned block on one device, beside the most bytes its step has live at once. */
export interface GraphMemory {
  readonly device: number
  readonly planned: number
  readonly peakLive: number
}

export interface JitOptions {
  /** Indices (or parameter names) of arguments whose arrays the step may update in place. */
  readonly donate?: ReadonlyArray<number | string>
  /**
   * Replay as a graph where the backend has graphs (a CUDA graph on the GPU): after the trace and
   * one op-by-op replay (which warms the allocator, op scratch and matmul plans), the third call of
   * a layout captures the replay and every later call launches it with no per-op host work. The
   * step's buffers live in one block per device planned from their lifetimes (memoryPlan.ts). Donated inputs
   * must be the same arrays on every call (an in-place optimizer step's are); other inputs are
   * copied into the graph's own buffers and results copied out of them. A call the graph cannot
   * serve (other donated arrays) replays op by op; a capture that fails (a host synchronisation
   * inside the step, no memory for the block) leaves that layout on op-by-op replay, with the
   * reason in `graphError`.
   */
  readonly graph?: boolean
  /** Layouts to give the result's arrays (Magix's out_shardings); converted inside the step. */
  readonly outShardings?: ReadonlyArray<unknown>
}

/** Parameter names of a function, for `donate: ["params", "optState"]`. */
const parameterNames = (f: (...a: never[]) => unknown): string[] => {
  const src = f.toString()
  const m = /^[^(]*\(([^)]*)\)/.exec(src) ?? /^\s*([A-Za-z_$][\w$]*)\s*=>/.exec(src)
  return m
    ? m[1]!.split(",").map((s) =>
        s
          .trim()
          .replace(/[=:].*$/, "")
          .trim(),
      )
    : []
}

export interface Jitted<A extends unknown[], R> {
  (...args: A): Effect.Effect<R, DeviceError>
  /** Number of traces so far (a new layout of the inputs traces again). */
  readonly traces: number
  /** Calls served by launching a captured graph. */
  readonly graphLaunches: number
  /** Nodes of the graphs captured so far (kernels, copies and collectives one launch runs). */
  readonly graphNodes: ReadonlyArray<number>
  /** Why the last graph capture failed, if one did. */
  readonly graphError: unknown
  /** The memory blocks of the graphs captured so far. */
  readonly graphMemory: ReadonlyArray<GraphMemory>
  /** Frees the buffers the traces keep; a later call traces again. */
  readonly dispose: () => void
}

/** How a replay or a capture makes a step's buffers and fills its host data. */
interface CallHandlers {
  readonly alloc: (c: Extract<Call, { kind: "alloc" }>) => BufferId
  readonly write: (c: Extract<Call, { kind: "write" }>, buffer: BufferId) => void
  readonly freed?: (buffer: BufferId) => void
}

/** Runs recorded calls on `backend`, mapping slots to buffers through `ids` (updated as it goes). */
const runCalls = (
  backend: Backend,
  calls: ReadonlyArray<Call>,
  ids: Map<number, BufferId>,
  on: CallHandlers,
): void => {
  const id = (s: number) => {
    const v = ids.get(s)
    if (v === undefined) throw new Error(`jit: replay reached slot ${s} before it was allocated`)
    return v
  }
  for (const c of calls) {
    switch (c.kind) {
      case "alloc":
        ids.set(c.slot, on.alloc(c))
        break
      case "free": {
        const b = id(c.slot)
        backend.free(b)
        on.freed?.(b)
        ids.delete(c.slot)
        break
      }
      case "exec":
        backend.exec(c.op, c.slots.map(id), c.args)
        break
      case "copy":
        backend.copy(id(c.dst), c.dstOffset, id(c.src), c.srcOffset, c.bytes)
        break
      case "write":
        on.write(c, id(c.slot))
        break
    }
  }
}

export const jit = <A extends unknown[], R>(
  step: (...args: A) => R,
  options: JitOptions = {},
): Jitted<A, R> => {
  const names = parameterNames(step as (...a: never[]) => unknown)
  const donated = new Set((options.donate ?? []).map((d) => (typeof d === "number" ? d : names.indexOf(d))))
  if (donated.has(-1))
    throw new Error(`jit: donate names ${options.donate} do not all name parameters of the step (${names})`)
  const traces = new Map<string, Trace>()
  const graphs = new Map<string, GraphReplay | "op-by-op">()
  const replays = new Map<string, number>()
  let count = 0
  let launches = 0
  let graphError: unknown
  // Buffers the traces made and keep for every replay (constants of the step): this jit owns them.
  const owned: Array<{ readonly backend: Backend; readonly id: BufferId }> = []

  const trace = (engine: Engine, args: A, key: string): R => {
    const recorder = new Recorder(engine.backend)
    const inputs = arraysOf(args)
    const inputSlots = inputs.map((a) => a.buffers.map((b) => recorder.input(b)))
    args.forEach((arg, i) => {
      if (donated.has(i)) return
      for (const a of arraysOf(arg))
        for (const b of a.buffers) recorder.readOnly.set(recorder.slot(b), names[i] ?? `argument ${i}`)
    })
    const result = engine.withBackend(recorder, () => engine.tidy(() => step(...args)))
    const outputs = arraysOf(result)
    const outputSlots = new Map(outputs.map((o) => [o, o.buffers.map((b) => recorder.slot(b))] as const))
    const outputInput = new Map<ShardedArray, number>()
    outputs.forEach((o) => {
      const i = inputs.indexOf(o)
      if (i >= 0) outputInput.set(o, i)
    })
    const resultSlots = new Set([...outputSlots.values()].flat())
    const inputSet = new Set(inputSlots.flat())
    const captured = new Map<number, BufferId>()
    for (const c of recorder.calls)
      if (
        c.kind === "alloc" &&
        !recorder.freed.has(c.slot) &&
        !resultSlots.has(c.slot) &&
        !inputSet.has(c.slot)
      ) {
        captured.set(c.slot, recorder.traced[c.slot]!)
        owned.push({ backend: engine.backend, id: recorder.traced[c.slot]! })
      }
    // Buffers made before the trace (a model's caches) are used as they are; freeing one of them
    // later makes a replay fail with a typed error, never touch freed memory.
    for (const s of recorder.external) if (!inputSet.has(s)) captured.set(s, recorder.traced[s]!)
    traces.set(key, {
      key,
      calls: recorder.calls.filter(
        (c) => !("slot" in c && captured.has(c.slot) && (c.kind === "alloc" || c.kind === "write")),
      ),
      inputSlots,
      captured,
      template: result,
      outputSlots,
      outputInput,
    })
    count++
    return result
  }

  const replay = (engine: Engine, t: Trace, args: A): R => {
    const backend = engine.backend
    const inputs = arraysOf(args)
    const ids = new Map<number, BufferId>(t.captured)
    t.inputSlots.forEach((slots, i) => {
      slots.forEach((s, p) => {
        ids.set(s, inputs[i]!.buffers[p]!)
      })
    })
    const id = (s: number) => {
      const v = ids.get(s)
      if (v === undefined) throw new Error(`jit: replay reached slot ${s} before it was allocated`)
      return v
    }
    const live: BufferId[] = []
    try {
      runCalls(backend, t.calls, ids, {
        alloc: (c) => {
          const b = backend.alloc(c.device, c.bytes)
          live.push(b)
          return b
        },
        write: (c, b) => backend.write(b, c.offset, c.data),
      })
    } catch (e) {
      // A failed replay frees what it allocated and has not handed out.
      for (const [s, b] of ids) if (live.includes(b) && !t.inputSlots.flat().includes(s)) backend.free(b)
      throw e
    }
    return rebuild(t.template, (o) => {
      const i = t.outputInput.get(o)
      if (i !== undefined) return inputs[i]!
      const slots = t.outputSlots.get(o)!
      return new ShardedArray(engine, o.shape, o.dtype, o.sharding as NamedSharding, slots.map(id), o.partial)
    }) as R
  }

  /** Slots of the donated inputs' buffers: a graph launch needs these very buffers again. */
  const donatedSlots = (t: Trace, args: A): Set<number> => {
    const out = new Set<number>()
    let k = 0
    args.forEach((arg, i) => {
      for (const _ of arraysOf(arg)) {
        if (donated.has(i)) for (const s of t.inputSlots[k]!) out.add(s)
        k++
      }
    })
    return out
  }

  /**
   * Captures the replay of `t` as a graph and launches it once (capture itself runs nothing).
   * Returns undefined, with everything it made freed, when the capture fails.
   */
  const capture = (engine: Engine, t: Trace, args: A): GraphReplay | undefined => {
    const backend = engine.backend
    const g = backend.graphs!
    const inputs = arraysOf(args)
    const donatedSet = donatedSlots(t, args)
    const made: BufferId[] = []
    const make = (device: number, bytes: number) => {
      const b = backend.alloc(device, bytes)
      made.push(b)
      return b
    }
    const ids = new Map<number, BufferId>(t.captured)
    const fixed = new Map<number, BufferId>()
    const copies = new Map<number, { readonly buffer: BufferId; readonly bytes: number }>()
    const constants = new Map<Call, BufferId>()
    const blocks = new Map<number, BufferId>()
    const id = (s: number) => {
      const v = ids.get(s)
      if (v === undefined) throw new Error(`jit: capture reached slot ${s} before it was allocated`)
      return v
    }
    // Every buffer the step allocates lives in one planned block per device for the graph's life.
    const freedAt = new Map<number, number>()
    t.calls.forEach((c, i) => {
      if (c.kind === "free") freedAt.set(c.slot, i)
    })
    const lifetimes: Lifetime[] = []
    t.calls.forEach((c, i) => {
      if (c.kind === "alloc")
        lifetimes.push({
          key: c.slot,
          device: c.device,
          bytes: c.bytes,
          start: i,
          end: freedAt.get(c.slot) ?? t.calls.length,
        })
    })
    const plan = planMemory(lifetimes)
    const lowest = peakLive(lifetimes)
    const memory = [...plan.blockBytes].map(([device, planned]) => ({
      device,
      planned,
      peakLive: lowest.get(device) ?? 0,
    }))
    // The graph's own memory comes first: where the device cannot hold it (the op-by-op cache is
    // not this block), the step stays op by op rather than failing.
    try {
      t.inputSlots.forEach((slots, i) => {
        const a = inputs[i]!
        slots.forEach((s, p) => {
          if (ids.has(s)) return
          const caller = a.buffers[p]!
          if (donatedSet.has(s)) {
            ids.set(s, caller)
            fixed.set(s, caller)
          } else {
            // The graph reads its own copy: the caller's buffer may be gone by the next launch.
            const own = make(a.mesh.devices[p]!, a.bytesPerDevice)
            backend.copy(own, 0, caller, 0, a.bytesPerDevice)
            ids.set(s, own)
            copies.set(s, { buffer: own, bytes: a.bytesPerDevice })
          }
        })
      })
      // Host data the step writes becomes a device constant copied in by the graph.
      for (const c of t.calls)
        if (c.kind === "write") {
          const alloc = t.calls.find((a) => a.kind === "alloc" && a.slot === c.slot)
          const k = make(alloc && alloc.kind === "alloc" ? alloc.device : 0, c.data.byteLength)
          backend.write(k, 0, c.data)
          constants.set(c, k)
        }
      for (const [device, bytes] of plan.blockBytes) blocks.set(device, make(device, bytes))
    } catch (e) {
      graphError = e
      for (const b of made) backend.free(b)
      return undefined
    }
    const inCapture: BufferId[] = []
    let graph: GraphId | undefined
    try {
      g.begin()
      try {
        runCalls(backend, t.calls, ids, {
          alloc: (c) => {
            const b = g.alias(blocks.get(c.device)!, plan.offsets.get(c.slot)!, c.bytes)
            inCapture.push(b)
            return b
          },
          write: (c, b) => backend.copy(b, c.offset, constants.get(c)!, 0, c.data.byteLength),
          freed: (b) => {
            const at = inCapture.indexOf(b)
            if (at >= 0) inCapture.splice(at, 1)
          },
        })
        graph = g.end()
      } catch (e) {
        g.abort()
        throw e
      }
    } catch (e) {
      graphError = e
      for (const b of [...inCapture, ...made]) backend.free(b)
      return undefined
    }
    const outputs = new Map<number, BufferId>()
    const inputSet = new Set(t.inputSlots.flat())
    for (const slots of t.outputSlots.values())
      for (const s of slots) if (!inputSet.has(s)) outputs.set(s, id(s))
    return {
      graph,
      backend,
      fixed,
      copies,
      outputs,
      buffers: [...inCapture, ...made],
      nodes: g.nodes(graph),
      memory,
    }
  }

  /** Launches a captured graph for this call, or returns undefined when the call's donated buffers differ. */
  const launch = (engine: Engine, t: Trace, r: GraphReplay, args: A): R | undefined => {
    const backend = engine.backend
    const inputs = arraysOf(args)
    const given = new Map<number, BufferId>()
    t.inputSlots.forEach((slots, i) => {
      slots.forEach((s, p) => {
        given.set(s, inputs[i]!.buffers[p]!)
      })
    })
    for (const [s, b] of r.fixed) if (given.get(s) !== b) return undefined
    for (const [s, c] of r.copies) backend.copy(c.buffer, 0, given.get(s)!, 0, c.bytes)
    backend.graphs!.launch(r.graph)
    launches++
    // Results leave the graph's buffers (the next launch overwrites them) for fresh ones.
    const fresh = new Map<number, BufferId>()
    const made: BufferId[] = []
    try {
      for (const [s, b] of r.outputs) {
        const o = [...t.outputSlots].find(([, slots]) => slots.includes(s))!
        const [arr, slots] = o
        const device = arr.mesh.devices[slots.indexOf(s)]!
        const f = backend.alloc(device, arr.bytesPerDevice)
        made.push(f)
        backend.copy(f, 0, b, 0, arr.bytesPerDevice)
        fresh.set(s, f)
      }
    } catch (e) {
      for (const b of made) backend.free(b)
      throw e
    }
    return rebuild(t.template, (o) => {
      const i = t.outputInput.get(o)
      if (i !== undefined) return inputs[i]!
      const slots = t.outputSlots.get(o)!
      return new ShardedArray(
        engine,
        o.shape,
        o.dtype,
        o.sharding as NamedSharding,
        slots.map((s) => fresh.get(s) ?? given.get(s) ?? r.fixed.get(s)!),
        o.partial,
      )
    }) as R
  }

  const call = (engine: Engine, t: Trace, args: A): R => {
    if (!options.graph || !engine.backend.graphs) return replay(engine, t, args)
    const n = (replays.get(t.key) ?? 0) + 1
    replays.set(t.key, n)
    let r = graphs.get(t.key)
    // The first replay runs op by op: it warms the allocator's cache, the op scratch and the
    // cuBLASLt plans, so the capture that follows makes no new ones.
    if (r === undefined && n >= 2) {
      r = capture(engine, t, args) ?? "op-by-op"
      graphs.set(t.key, r)
      if (r !== "op-by-op") {
        owned.push(...r.buffers.map((id) => ({ backend: engine.backend, id })))
        graphOwners.push(r)
      }
    }
    if (r === undefined || r === "op-by-op") return replay(engine, t, args)
    return launch(engine, t, r, args) ?? replay(engine, t, args)
  }

  const graphOwners: GraphReplay[] = []

  const jitted = (...args: A) =>
    attempt(() => {
      const first = arraysOf(args)[0]
      if (!first) throw new Error("jit: the step takes no arrays")
      const engine = first.engine
      const key = layoutKey(args)
      const t = traces.get(key)
      return t ? call(engine, t, args) : trace(engine, args, key)
    })
  Object.defineProperty(jitted, "traces", { get: () => count })
  Object.defineProperty(jitted, "graphLaunches", { get: () => launches })
  Object.defineProperty(jitted, "graphNodes", { get: () => graphOwners.map((r) => r.nodes) })
  Object.defineProperty(jitted, "graphError", { get: () => graphError })
  Object.defineProperty(jitted, "graphMemory", { get: () => graphOwners.flatMap((r) => r.memory) })
  Object.defineProperty(jitted, "dispose", {
    value: () => {
      // A graph goes before the buffers it uses.
      for (const r of graphOwners.splice(0)) r.backend.graphs!.destroy(r.graph)
      for (const { backend, id } of owned.splice(0)) backend.free(id)
      traces.clear()
      graphs.clear()
      replays.clear()
    },
  })
  return jitted as Jitted<A, R>
}
