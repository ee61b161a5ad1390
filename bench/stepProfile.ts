/**
 * A per-op GPU time profile of one training step (CUDA only): a Backend that brackets every op
 * with CUDA events on the device's stream and reads the elapsed time back after it, so each op is
 * timed alone on the GPU (the host waits after every op: the step's own wall time is meaningless
 * while profiling, its ops' GPU times are not). Matmuls are told apart by shape.
 */
import type { Backend } from "../src/core/backend.ts"

export interface OpTime {
  readonly op: string
  readonly count: number
  readonly ms: number
}

const keyOf = (op: string, args: ReadonlyArray<number>) => {
  if (op !== "matmul") return op
  const [, batch, m, n, k, ta, tb] = args
  return `matmul ${batch! > 1 ? `${batch}×` : ""}${m}×${n}×${k}${ta ? " Aᵀ" : ""}${tb ? " Bᵀ" : ""}`
}

/** Runs `body` with every op of `backend` timed on device 0; returns the ops by total time. */
export const profileOps = <A>(
  backend: Backend,
  withBackend: <B>(b: Backend, f: () => B) => B,
  body: () => A,
): { readonly result: A; readonly ops: OpTime[] } => {
  const out = backend.alloc(0, 8)
  const times = new Map<string, { count: number; ms: number }>()
  const timed: Backend = {
    ...backend,
    exec: (op, buffers, args) => {
      backend.exec("event_record", [], [0, 1000])
      backend.exec(op, buffers, args)
      backend.exec("event_record", [], [0, 1001])
      backend.exec("event_elapsed", [out], [0, 1000, 1001])
      const ms = new Float64Array(backend.read(out, 0, 8).slice().buffer)[0]!
      const k = keyOf(op, args)
      const t = times.get(k) ?? { count: 0, ms: 0 }
      t.count++
      t.ms += ms
      times.set(k, t)
    },
  }
  try {
    const result = withBackend(timed, body)
    const ops = [...times].map(([op, t]) => ({ op, ...t })).sort((a, b) => b.ms - a.ms)
    return { result, ops }
  } finally {
    backend.free(out)
  }
}
