/**
 * Graph capture and replay (core/backend.ts Graphs; jit's `graph` option). On the CPU backend a
 * graph is the recorded op list, so everything a CUDA graph must get right shows here too: a
 * captured train step gives the same losses and parameters bit for bit as op-by-op replay over
 * fresh batches (the inputs are copied into the graph's buffers, results copied out), memory freed
 * inside the capture stays with the graph until it is destroyed, host transfers are refused inside
 * a capture, and a launch over a freed buffer is a typed error, never a write into freed memory.
 */
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import type { Backend } from "../../src/core/backend.ts"
import { DeviceOutOfMemory, NativeInvariantViolation } from "../../src/core/errors.ts"
import { jit } from "../../src/core/jit.ts"
import { add, scale } from "../../src/core/ops/elementwise.ts"
import { fromHost, type ShardedArray, toHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { Devices } from "../../src/layers/Devices.ts"
import { mesh, runCpu } from "../helpers.ts"
import { graphTrainRun, launchTwice } from "./graphRun.ts"

const STEPS = 5

/** Five train steps of the llama fixture on a 2×2 mesh, each on another batch. */
const train = (graph: boolean) => runCpu(4, graphTrainRun({ graph, steps: STEPS, meshShape: [2, 2] }))

/** acc += x (acc donated, updated in place), returning 2x too: a graph-replayed jit on one CPU device. */
const accumulatingStep = Effect.gen(function* () {
  const { engine } = yield* Devices
  const m = mesh([1, 1])
  const place = (v: number) =>
    fromHost(engine, new Float32Array([v, v, v, v]), [4], "float32", new NamedSharding(m, P()))
  const step = jit(
    (acc: ShardedArray, x: ShardedArray) => {
      add(acc, x, acc)
      return { acc, twice: scale(x, 2) }
    },
    { donate: [0], graph: true },
  )
  return { engine, place, step }
})

describe("graph replay of a jitted step", () => {
  it("a captured train step matches op-by-op replay bit for bit over changing batches", async () => {
    const plain = await train(false)
    const graphed = await train(true)
    expect(plain.counts.launches).toBe(0)
    // Call 1 traces, call 2 replays op by op (warm-up), calls 3-5 launch the graph.
    expect(graphed.counts.error).toBeUndefined()
    expect(graphed.counts.launches).toBe(STEPS - 2)
    expect(graphed.counts.nodes).toHaveLength(1)
    expect(graphed.counts.nodes[0]).toBeGreaterThan(100)
    expect(graphed.losses).toEqual(plain.losses)
    expect(new Set(graphed.losses).size).toBe(STEPS)
    expect(graphed.kept).toEqual(graphed.losses)
    // The planned block holds every buffer of the step in about the step's own peak.
    expect(graphed.memory.replayPeak).toBeGreaterThan(0)
    expect(graphed.memory.graphHeld).toBeLessThan(graphed.memory.replayPeak * 1.1)
    for (const [i, [name, p]] of plain.params.entries()) expect(graphed.params[i]![1], name).toEqual(p)
  })

  it("serves fresh results per launch and replays op by op when the donated arrays differ", async () => {
    const out = await runCpu(
      1,
      Effect.gen(function* () {
        const { place, step } = yield* accumulatingStep
        const acc = yield* place(0)
        const twice: ShardedArray[] = []
        for (let k = 1; k <= 4; k++) twice.push((yield* step(acc, yield* place(k))).twice)
        const launched = step.graphLaunches
        const other = yield* place(100)
        const r = yield* step(other, yield* place(5))
        const seen = {
          launched,
          after: step.graphLaunches,
          acc: Array.from(toHost(acc) as Float32Array),
          other: Array.from(toHost(other) as Float32Array),
          same: r.acc === other,
          twice: twice.map((t) => (toHost(t) as Float32Array)[0]),
        }
        step.dispose()
        return seen
      }),
    )
    expect(out.launched).toBe(2)
    expect(out.after).toBe(2)
    expect(out.acc).toEqual([10, 10, 10, 10])
    expect(out.other).toEqual([105, 105, 105, 105])
    expect(out.same).toBe(true)
    expect(out.twice).toEqual([2, 4, 6, 8])
  })

  it("stays op by op, with the same results, when the graph's memory cannot be had", async () => {
    const out = await runCpu(
      1,
      Effect.gen(function* () {
        const { engine, place, step } = yield* accumulatingStep
        // A device that refuses the first allocation asked of it once armed: the capture's.
        let armed = false
        const inner = engine.backend
        const refusing: Backend = {
          ...inner,
          alloc: (device, bytes) => {
            if (!armed) return inner.alloc(device, bytes)
            armed = false
            throw new DeviceOutOfMemory({ device, requested: bytes, free: 0, inUse: 0, capacity: 0 })
          },
        }
        const acc = yield* place(0)
        const twice: number[] = []
        for (let k = 1; k <= 4; k++) {
          const x = yield* place(k)
          armed = k === 3
          const r = engine.withBackend(refusing, () => Effect.runSync(step(acc, x)))
          twice.push((toHost(r.twice) as Float32Array)[0]!)
        }
        const seen = {
          launches: step.graphLaunches,
          error: step.graphError,
          acc: Array.from(toHost(acc) as Float32Array),
          twice,
        }
        step.dispose()
        return seen
      }),
    )
    expect(out.error).toBeInstanceOf(DeviceOutOfMemory)
    expect(out.launches).toBe(0)
    expect(out.acc).toEqual([10, 10, 10, 10])
    expect(out.twice).toEqual([2, 4, 6, 8])
  })
})

describe("native graphs (CPU backend)", () => {
  const withBackend = <A>(f: (b: Backend) => A) =>
    runCpu(
      1,
      Effect.gen(function* () {
        const { engine } = yield* Devices
        return f(engine.backend)
      }),
    )

  it("records ops instead of running them, and each launch runs them again", async () => {
    const seen = await withBackend(launchTwice)
    expect(seen.afterCapture).toEqual([10, 20, 30, 40])
    expect(seen.once).toEqual([11, 22, 33, 44])
    expect(seen.twice).toEqual([12, 24, 36, 48])
    expect(seen.nodes).toBe(1)
  })

  it("keeps memory freed inside a capture until the graph is destroyed", async () => {
    const seen = await withBackend((b) => {
      const g = b.graphs!
      const base = b.stats(0).inUse
      g.begin()
      const t = b.alloc(0, 1 << 20)
      b.free(t)
      // Taken again from the graph's pool: still one block's worth in use.
      const u = b.alloc(0, 1 << 20)
      b.free(u)
      const id = g.end()
      const held = b.stats(0).inUse - base
      g.destroy(id)
      return { held, after: b.stats(0).inUse - base }
    })
    expect(seen.held).toBe(1 << 20)
    expect(seen.after).toBe(0)
  })

  it("refuses host transfers inside a capture and launches over freed buffers, with typed errors", async () => {
    const seen = await withBackend((b) => {
      const g = b.graphs!
      const x = b.alloc(0, 16)
      const y = b.alloc(0, 16)
      const errors: unknown[] = []
      const attempt = (f: () => void) => {
        try {
          f()
        } catch (e) {
          errors.push(e)
        }
      }
      g.begin()
      attempt(() => b.write(x, 0, new Float32Array(4)))
      attempt(() => b.read(x, 0, 16))
      attempt(() => g.begin())
      b.exec("axpby", [x, y], [0, 4, 1, 1])
      const id = g.end()
      b.free(x)
      attempt(() => g.launch(id))
      g.destroy(id)
      attempt(() => g.launch(id))
      b.free(y)
      return errors.map((e) => [e instanceof NativeInvariantViolation, String((e as Error).message)] as const)
    })
    expect(seen.map(([typed]) => typed)).toEqual([true, true, true, true, true])
    expect(seen[0]![1]).toMatch(/host data cannot enter a graph capture/)
    expect(seen[1]![1]).toMatch(/cannot read device memory/)
    expect(seen[2]![1]).toMatch(/already running/)
    expect(seen[3]![1]).toMatch(/does not exist or was already freed/)
    expect(seen[4]![1]).toMatch(/graph \d+ does not exist/)
  })
})
