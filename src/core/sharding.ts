/**
 * PartitionSpec and NamedSharding, JAX's vocabulary: a spec names, per array dimension, the
 * mesh axes it is split over (none, one, or several, the first most significant); a
 * NamedSharding binds a spec to a mesh and gives each device its slice.
 */
import { Effect, Schema } from "effect"
import type { Mesh } from "./mesh.ts"
import { formatShape, type Shape } from "./shape.ts"

export type SpecEntry = null | string | ReadonlyArray<string>

export class PartitionSpec {
  /** Axis names per dimension; [] where the dimension is not split. */
  readonly entries: ReadonlyArray<ReadonlyArray<string>>

  constructor(entries: ReadonlyArray<SpecEntry>) {
    this.entries = entries.map((e) => (e === null ? [] : typeof e === "string" ? [e] : [...e]))
  }

  get length(): number {
    return this.entries.length
  }

  /** Every axis the spec uses, in order of appearance. */
  get axes(): string[] {
    return this.entries.flat()
  }

  /** The spec padded with unsplit dimensions up to `rank` (JAX pads trailing dimensions). */
  padTo(rank: number): PartitionSpec {
    if (this.entries.length >= rank) return this
    return new PartitionSpec([
      ...this.entries,
      ...new Array<SpecEntry>(rank - this.entries.length).fill(null),
    ])
  }

  /** The same spec without the given axes: replicated over them. */
  without(axes: ReadonlyArray<string>): PartitionSpec {
    return new PartitionSpec(this.entries.map((e) => e.filter((a) => !axes.includes(a))))
  }

  equals(other: PartitionSpec): boolean {
    const n = Math.max(this.length, other.length)
    for (let i = 0; i < n; i++) {
      const a = this.entries[i] ?? []
      const b = other.entries[i] ?? []
      if (a.length !== b.length || a.some((x, j) => x !== b[j])) return false
    }
    return true
  }

  toString(): string {
    const show = (e: ReadonlyArray<string>) =>
      e.length === 0 ? "None" : e.length === 1 ? e[0]! : `(${e.join(", ")})`
    return `P(${this.entries.map(show).join(", ")})`
  }

  toJSON(): ReadonlyArray<SpecEntry> {
    return this.entries.map((e) => (e.length === 0 ? null : e.length === 1 ? e[0]! : [...e]))
  }
}

/**
 * Whether two specs split an array of this rank the same way on `mesh`: equal once the mesh's
 * axes of size 1 are left out (splitting over one device changes nothing, so no data moves).
 */
export const sameSplit = (mesh: Mesh, a: PartitionSpec, b: PartitionSpec, rank: number): boolean => {
  const trivial = mesh.axisNames.filter((n) => mesh.axisSize(n) === 1)
  return a.padTo(rank).without(trivial).equals(b.padTo(rank).without(trivial))
}

/** `P("data", "model")`, `P(null, ["data", "model"])`: JAX's PartitionSpec(...) spelling. */
export const P = (...entries: SpecEntry[]): PartitionSpec => new PartitionSpec(entries)

export class UnknownMeshAxis extends Schema.TaggedError<UnknownMeshAxis>()("UnknownMeshAxis", {
  parameter: Schema.String,
  axis: Schema.String,
  meshAxes: Schema.Array(Schema.String),
}) {
  override get message() {
    return (
      `${this.parameter}: the spec names mesh axis "${this.axis}", but the mesh has only ` +
      `(${this.meshAxes.join(", ")}); use one of those names or change the mesh`
    )
  }
}

export class AxisUsedTwice extends Schema.TaggedError<AxisUsedTwice>()("AxisUsedTwice", {
  parameter: Schema.String,
  axis: Schema.String,
  spec: Schema.String,
}) {
  override get message() {
    return `${this.parameter}: mesh axis "${this.axis}" appears twice in ${this.spec}; an axis can split only one dimension`
  }
}

export class IndivisibleDimension extends Schema.TaggedError<IndivisibleDimension>()("IndivisibleDimension", {
  parameter: Schema.String,
  dimension: Schema.Number,
  size: Schema.Number,
  axes: Schema.Array(Schema.String),
  axesSize: Schema.Number,
  mesh: Schema.String,
}) {
  override get message() {
    return (
      `${this.parameter}: dimension ${this.dimension} has size ${this.size}, which mesh axes ` +
      `(${this.axes.join(", ")}) of ${this.mesh} cannot split evenly into ${this.axesSize} parts; ` +
      "change the partition rule for this parameter or the mesh shape"
    )
  }
}

export class SpecRankMismatch extends Schema.TaggedError<SpecRankMismatch>()("SpecRankMismatch", {
  parameter: Schema.String,
  spec: Schema.String,
  shape: Schema.Array(Schema.Number),
}) {
  override get message() {
    return `${this.parameter}: spec ${this.spec} has more entries than the array ${formatShape(this.shape)} has dimensions`
  }
}

export type ShardingError = UnknownMeshAxis | AxisUsedTwice | IndivisibleDimension | SpecRankMismatch

/** Offsets and shape of one device's block of a global array. */
export interface Slice {
  readonly offsets: ReadonlyArray<number>
  readonly shape: ReadonlyArray<number>
}

export class NamedSharding {
  constructor(
    readonly mesh: Mesh,
    readonly spec: PartitionSpec,
  ) {}

  /** Checks the spec against the mesh and a global shape; `parameter` names the array in errors. */
  validate(shape: Shape, parameter = "array"): Effect.Effect<void, ShardingError> {
    return Effect.suspend((): Effect.Effect<void, ShardingError> => {
      const { mesh, spec } = this
      if (spec.length > shape.length)
        return Effect.fail(new SpecRankMismatch({ parameter, spec: spec.toString(), shape: [...shape] }))
      const seen = new Set<string>()
      for (const axis of spec.axes) {
        if (!mesh.hasAxis(axis))
          return Effect.fail(new UnknownMeshAxis({ parameter, axis, meshAxes: [...mesh.axisNames] }))
        if (seen.has(axis)) return Effect.fail(new AxisUsedTwice({ parameter, axis, spec: spec.toString() }))
        seen.add(axis)
      }
      for (let d = 0; d < spec.length; d++) {
        const axes = spec.entries[d]!
        const parts = mesh.axesSize(axes)
        if (shape[d]! % parts !== 0)
          return Effect.fail(
            new IndivisibleDimension({
              parameter,
              dimension: d,
              size: shape[d]!,
              axes: [...axes],
              axesSize: parts,
              mesh: mesh.toString(),
            }),
          )
      }
      return Effect.void
    })
  }

  /** Number of parts each dimension is split into. */
  partsPerDim(rank: number): number[] {
    const spec = this.spec.padTo(rank)
    return spec.entries.map((axes) => this.mesh.axesSize(axes))
  }

  /** The shape every device holds (the spec must have been validated against `shape`). */
  shardShape(shape: Shape): number[] {
    const parts = this.partsPerDim(shape.length)
    return shape.map((d, i) => d / parts[i]!)
  }

  /** The block of `shape` held at mesh position `position`. */
  slice(position: number, shape: Shape): Slice {
    const spec = this.spec.padTo(shape.length)
    const local = this.shardShape(shape)
    const offsets = spec.entries.map((axes, d) =>
      axes.length === 0 ? 0 : this.mesh.indexAlong(position, axes) * local[d]!,
    )
    return { offsets, shape: local }
  }

  /** Every mesh position's block, in mesh order. */
  slices(shape: Shape): Slice[] {
    return Array.from({ length: this.mesh.size }, (_, p) => this.slice(p, shape))
  }

  /** Mesh axes the array is replicated over. */
  get replicatedAxes(): string[] {
    const used = new Set(this.spec.axes)
    return this.mesh.axisNames.filter((a) => !used.has(a))
  }

  /** How many devices hold each element. */
  get replication(): number {
    return this.mesh.axesSize(this.replicatedAxes)
  }

  equals(other: NamedSharding): boolean {
    return this.mesh === other.mesh && this.spec.equals(other.spec)
  }

  toString(): string {
    return `NamedSharding(${this.mesh}, ${this.spec})`
  }
}
