/**
 * Where the data stands after a batch, as JSON-able data for a checkpoint manifest: epoch and step
 * in padding mode, and a cursor per lane in packing mode (see batching.ts).
 */
import { Schema } from "effect"
import { DataPositionMismatch } from "./errors.ts"
import type { BatchPlan } from "./plan.ts"

/** Where lane `lane` resumes: token `offset` of its `index`-th document of `epoch`. */
export const LaneCursor = Schema.Struct({
  lane: Schema.Number,
  epoch: Schema.Number,
  index: Schema.Number,
  offset: Schema.Number,
})
export type LaneCursor = typeof LaneCursor.Type

/**
 * Where the data stands after a batch, as JSON-able data for a checkpoint manifest. The setup
 * fields make a position from another dataset or batch shape a typed error rather than a silent
 * change of order.
 */
export const DataPosition = Schema.Struct({
  mode: Schema.Literals(["padding", "packing"]),
  seed: Schema.Number,
  shuffle: Schema.Boolean,
  documents: Schema.Number,
  batchSize: Schema.Number,
  maxLength: Schema.Number,
  /** Batches produced since the start of training. */
  steps: Schema.Number,
  /** Padding: the epoch of the next batch. Packing: the lowest epoch any lane held here is in. */
  epoch: Schema.Number,
  /** Padding: the index of the next batch within its epoch. Packing: 0. */
  stepInEpoch: Schema.Number,
  /** Packing: one cursor per lane (only this process's lanes, see `mergeDataPositions`). */
  lanes: Schema.Array(LaneCursor),
})
export type DataPosition = typeof DataPosition.Type

/** The position before the first batch. */
export const initialPosition = (plan: BatchPlan): DataPosition => ({
  ...fingerprint(plan),
  steps: 0,
  epoch: 0,
  stepInEpoch: 0,
  lanes:
    plan.mode === "packing"
      ? Array.from({ length: plan.batchSize }, (_, lane) => ({ lane, epoch: 0, index: 0, offset: 0 }))
      : [],
})

/** The setup a position belongs to. */
export const fingerprint = (plan: BatchPlan) => ({
  mode: plan.mode,
  seed: plan.seed,
  shuffle: plan.shuffle,
  documents: plan.documents,
  batchSize: plan.batchSize,
  maxLength: plan.maxLength,
})

/** Checks that `position` was saved by a run with this plan and holds every lane in `lanes`. */
export const checkPosition = (
  plan: BatchPlan,
  position: DataPosition,
  lanes: ReadonlyArray<number>,
): void => {
  const expected = fingerprint(plan)
  const differ = (Object.keys(expected) as Array<keyof typeof expected>)
    .filter((k) => expected[k] !== position[k])
    .map((k) => `${k} was ${position[k]}, is now ${expected[k]}`)
  if (differ.length > 0) throw new DataPositionMismatch({ detail: differ.join("; ") })
  if (plan.mode === "padding") {
    if (position.stepInEpoch >= plan.docsPerLane || position.stepInEpoch < 0)
      throw new DataPositionMismatch({
        detail: `step ${position.stepInEpoch} of an epoch of ${plan.docsPerLane} steps`,
      })
    return
  }
  const held = new Map(position.lanes.map((c) => [c.lane, c]))
  const missing = lanes.filter((l) => !held.has(l))
  if (missing.length > 0)
    throw new DataPositionMismatch({
      detail:
        `it holds no cursor for lane(s) ${missing.slice(0, 8).join(", ")}${missing.length > 8 ? ", ..." : ""} ` +
        "(with several processes, merge their positions with mergeDataPositions before saving)",
    })
  for (const l of lanes) {
    const c = held.get(l)!
    if (c.index < 0 || c.index >= plan.docsPerLane || c.offset < 0 || c.epoch < 0)
      throw new DataPositionMismatch({ detail: `lane ${l} is at an impossible place (${JSON.stringify(c)})` })
  }
}

/** Combines the positions saved by each process (same batch) into one that holds every lane. */
export const mergeDataPositions = (parts: ReadonlyArray<DataPosition>): DataPosition => {
  const first = parts[0]
  if (first === undefined) throw new DataPositionMismatch({ detail: "no positions to merge" })
  const lanes = new Map<number, LaneCursor>()
  for (const p of parts) {
    for (const k of ["mode", "seed", "shuffle", "documents", "batchSize", "maxLength", "steps"] as const)
      if (p[k] !== first[k])
        throw new DataPositionMismatch({
          detail: `the positions to merge differ in ${k} (${first[k]} and ${p[k]})`,
        })
    for (const c of p.lanes) {
      const seen = lanes.get(c.lane)
      if (seen !== undefined && JSON.stringify(seen) !== JSON.stringify(c))
        throw new DataPositionMismatch({ detail: `two positions disagree on lane ${c.lane}` })
      lanes.set(c.lane, c)
    }
  }
  const merged = [...lanes.values()].sort((a, b) => a.lane - b.lane)
  return {
    ...first,
    epoch: merged.length > 0 ? Math.min(...merged.map((c) => c.epoch)) : first.epoch,
    lanes: merged,
  }
}
