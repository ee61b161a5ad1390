/**
 * Every op of the CPU table against bad arguments: from one valid call each, every buffer one
 * element short, every size negative, fractional or huge must be an invalid argument, and a size
 * of zero must either run or be rejected: never a crash or an access outside a buffer.
 */
import { afterAll, describe, expect, it } from "vitest"
import type { BufferId } from "../../src/core/backend.ts"
import { NativeInvariantViolation } from "../../src/core/errors.ts"
import { Cpu, expectInvalid } from "./helpers.ts"

const cpu = new Cpu(2)
afterAll(() => cpu.dispose())

type Kind = "f32" | "f64" | "i32" | "u8"
const esize: Record<Kind, number> = { f32: 4, f64: 8, i32: 4, u8: 1 }

interface Call {
  /** Element count and type of each buffer, optionally on another device. */
  buffers: Array<[number, Kind] | [number, Kind, number]>
  args: number[]
  /** Indices of the arguments that are sizes. */
  sizes: number[]
  /** Sizes that may be arbitrarily large (a window, an offset, a chunk): no buffer grows with them. */
  unbounded?: number[]
}

// Small shapes, every buffer exactly as large as the arguments need.
const [n, N, D, V, H, hd, T, S] = [6, 3, 4, 5, 2, 4, 3, 4]
const calls: Record<string, Call> = {
  fill: { buffers: [[n, "f32"]], args: [0, n, 1], sizes: [1] },
  cast: {
    buffers: [
      [n, "f32"],
      [n, "f64"],
    ],
    args: [0, 1, n],
    sizes: [2],
  },
  axpby: {
    buffers: [
      [n, "f32"],
      [n, "f32"],
    ],
    args: [0, n, 1, 1],
    sizes: [1],
  },
  add: {
    buffers: [
      [n, "f32"],
      [n, "f32"],
      [n, "f32"],
    ],
    args: [0, n],
    sizes: [1],
  },
  mul: {
    buffers: [
      [n, "f32"],
      [n, "f32"],
      [n, "f32"],
    ],
    args: [0, n],
    sizes: [1],
  },
  matmul: {
    buffers: [
      [2 * N * D, "f32"],
      [D * V, "f32"],
      [2 * N * V, "f32"],
    ],
    args: [0, 2, N, V, D, 0, 0, 1, 0, D, V, V, N * D, 0, N * V, 0, 0, 0],
    sizes: [1, 2, 3, 4, 9, 10, 11, 12, 13, 14, 15, 16, 17],
  },
  embedding_fwd: {
    buffers: [
      [V * D, "f32"],
      [N, "i32"],
      [N * D, "f32"],
    ],
    args: [0, N, V, D, 0],
    sizes: [1, 2, 3],
  },
  embedding_bwd: {
    buffers: [
      [N, "i32"],
      [N * D, "f32"],
      [V * D, "f32"],
    ],
    args: [0, N, V, D, 0, 0],
    sizes: [1, 2, 3],
  },
  rmsnorm_fwd: {
    buffers: [
      [N * D, "f32"],
      [D, "f32"],
      [N * D, "f32"],
      [N, "f32"],
    ],
    args: [0, N, D, 1e-6, 0],
    sizes: [1, 2],
  },
  rmsnorm_bwd: {
    buffers: [
      [N * D, "f32"],
      [N * D, "f32"],
      [D, "f32"],
      [N, "f32"],
      [N * D, "f32"],
      [D, "f32"],
    ],
    args: [0, N, D, 1, 0, 1],
    sizes: [1, 2],
  },
  rope: {
    buffers: [
      [N * H * hd, "f32"],
      [N, "i32"],
      [hd / 2, "f32"],
      [N * H * hd, "f32"],
    ],
    args: [0, N, H, hd, 1, 1],
    sizes: [1, 2, 3],
  },
  attention_fwd: {
    buffers: [
      [2 * T * H * hd, "f32"],
      [2 * S * hd, "f32"],
      [2 * S * hd, "f32"],
      [2 * T * H * hd, "f32"],
      [2 * H * T, "f32"],
      [2 * S, "u8"],
    ],
    args: [0, 2, T, S, H, 1, hd, 0.5, 1, 2, 1, 1, S],
    sizes: [1, 2, 3, 4, 5, 6, 9, 10, 12],
    unbounded: [9, 10],
  },
  attention_bwd: {
    buffers: [
      [2 * T * H * hd, "f32"],
      [2 * S * hd, "f32"],
      [2 * S * hd, "f32"],
      [2 * T * H * hd, "f32"],
      [2 * H * T, "f32"],
      [2 * T * H * hd, "f32"],
      [2 * T * H * hd, "f32"],
      [2 * S * hd, "f32"],
      [2 * S * hd, "f32"],
      [2 * S, "u8"],
    ],
    args: [0, 2, T, S, H, 1, hd, 0.5, 1, 2, 1, 1, S],
    sizes: [1, 2, 3, 4, 5, 6, 9, 10, 12],
    unbounded: [9, 10],
  },
  glu_fwd: {
    buffers: [
      [n, "f32"],
      [n, "f32"],
      [n, "f32"],
    ],
    args: [0, n, 1],
    sizes: [1],
  },
  glu_bwd: {
    buffers: [
      [n, "f32"],
      [n, "f32"],
      [n, "f32"],
      [n, "f32"],
      [n, "f32"],
    ],
    args: [0, n, 0],
    sizes: [1],
  },
  ce_fwd: {
    buffers: [
      [N * D, "f32"],
      [V * D, "f32"],
      [N, "i32"],
      [N, "f32"],
      [N, "f32"],
      [N, "f32"],
    ],
    args: [0, N, D, V, 2, 2],
    sizes: [1, 2, 3, 5],
    unbounded: [5],
  },
  ce_rescale: {
    buffers: [
      [N, "f32"],
      [N, "f32"],
      [N, "f32"],
    ],
    args: [0, N],
    sizes: [1],
  },
  ce_lse: {
    buffers: [
      [N, "f32"],
      [N, "f32"],
      [N, "f32"],
    ],
    args: [0, N],
    sizes: [1],
  },
  ce_rowloss: {
    buffers: [
      [N, "f32"],
      [N, "f32"],
      [N, "i32"],
      [N, "f32"],
      [N, "f32"],
    ],
    args: [0, N],
    sizes: [1],
  },
  ce_bwd: {
    buffers: [
      [N * D, "f32"],
      [V * D, "f32"],
      [N, "i32"],
      [N, "f32"],
      [N, "f32"],
      [N * D, "f32"],
      [V * D, "f32"],
    ],
    args: [0, N, D, V, 2, 2, 1, 0],
    sizes: [1, 2, 3, 5],
    unbounded: [5],
  },
  ce_fused: {
    buffers: [
      [N * D, "f32"],
      [V * D, "f32"],
      [N, "i32"],
      [N, "f32"],
      [N, "f32"],
      [N, "f32"],
      [N * D, "f32"],
      [V * D, "f32"],
    ],
    args: [0, N, D, V, 2, 1, 0],
    sizes: [1, 2, 3, 4],
    unbounded: [4],
  },
  sum: {
    buffers: [
      [n, "f32"],
      [1, "f32"],
    ],
    args: [0, n, 1, 0],
    sizes: [1],
  },
  sumsq: {
    buffers: [
      [n, "f32"],
      [1, "f64"],
    ],
    args: [0, n, 1, 0],
    sizes: [1],
  },
  sumsq_multi: {
    buffers: [
      [n, "f32"],
      [N, "f32"],
      [1, "f64"],
    ],
    args: [0, 2, 0, n, 1, N, 0.5],
    sizes: [1, 3, 5],
  },
  adamw: {
    buffers: [
      [8, "f64"],
      [1, "f64"],
      [n, "f32"],
      [n, "f32"],
      [n, "f32"],
      [n, "f32"],
    ],
    args: [0, 1, 0.9, 0.99, 1e-8, 1, 1, 2, 0, 1e-3, 2, 10, 0, n, 0.1],
    sizes: [1, 13],
  },
  all_reduce: {
    buffers: [
      [n, "f32", 0],
      [n, "f32", 1],
    ],
    args: [0, n, 0, 0],
    sizes: [1],
  },
  all_gather: {
    buffers: [
      [n, "f32", 0],
      [n, "f32", 1],
      [2 * n, "f32", 0],
      [2 * n, "f32", 1],
    ],
    args: [4, 2, n, 0],
    sizes: [0, 1, 2],
  },
  reduce_scatter: {
    buffers: [
      [2 * n, "f32", 0],
      [2 * n, "f32", 1],
      [n, "f32", 0],
      [n, "f32", 1],
    ],
    args: [0, 2, n, 1, 0],
    sizes: [1, 2],
  },
  broadcast: {
    buffers: [
      [n, "f32", 0],
      [n, "f32", 1],
    ],
    args: [4, n, 1, 0],
    sizes: [0, 1],
  },
}

/** Allocates the call's buffers (the i-th `short` by one element) filled with small values. */
const buffersFor = (call: Call, short = -1): BufferId[] =>
  call.buffers.map(([count, kind, device = 0], i) => {
    const m = i === short ? count - 1 : count
    const id = cpu.bytes(m * esize[kind], device)
    const data =
      kind === "f32"
        ? new Float32Array(m).fill(0.5)
        : kind === "f64"
          ? new Float64Array(m).fill(0.5)
          : kind === "i32"
            ? new Int32Array(m).fill(1)
            : new Uint8Array(m).fill(1)
    if (m > 0) cpu.backend.write(id, 0, data)
    return id
  })

const run = (op: string, call: Call, args = call.args, short = -1) => {
  const ids = buffersFor(call, short)
  try {
    cpu.exec(op, ids, args)
  } finally {
    for (const id of ids) cpu.free(id)
  }
}

describe.each(Object.entries(calls))("%s", (op, call) => {
  it("runs the valid call", () => run(op, call))

  it("rejects each buffer one element short", () => {
    call.buffers.forEach((_, i) =>
      expectInvalid(() => run(op, call, call.args, i), new RegExp(`buffer ${i}`)),
    )
  })

  it("rejects each size negative, fractional or huge", () => {
    for (const i of call.sizes)
      for (const bad of call.unbounded?.includes(i) ? [-1, 1.5] : [-1, 1.5, 2 ** 40]) {
        const args = call.args.slice()
        args[i] = bad
        expectInvalid(() => run(op, call, args))
      }
  })

  it("runs or rejects each size set to zero", () => {
    for (const i of call.sizes) {
      const args = call.args.slice()
      args[i] = 0
      try {
        run(op, call, args)
      } catch (e) {
        expect(e).toBeInstanceOf(NativeInvariantViolation)
      }
    }
  })
})

it("covers every op of the CPU table but copy_box and random_normal", () => {
  const ops = cpu.opNames().filter((op) => op !== "copy_box" && op !== "random_normal")
  expect(ops.sort()).toEqual(Object.keys(calls).sort())
})
