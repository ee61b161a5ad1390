/**
 * A named device mesh: an n-dimensional grid of devices with one name per axis (Magix's
 * `create_device_mesh`). Devices are laid out row-major in the order the runtime lists them.
 */
import { Effect, Schema } from "effect"

export class InvalidMeshShape extends Schema.TaggedError<InvalidMeshShape>()("InvalidMeshShape", {
  shape: Schema.Array(Schema.Number),
  devices: Schema.Number,
  reason: Schema.String,
}) {
  override get message() {
    return `mesh shape [${this.shape.join(", ")}] does not fit ${this.devices} device(s): ${this.reason}`
  }
}

export class MeshRankMismatch extends Schema.TaggedError<MeshRankMismatch>()("MeshRankMismatch", {
  shape: Schema.Array(Schema.Number),
  names: Schema.Array(Schema.String),
}) {
  override get message() {
    return (
      `mesh shape [${this.shape.join(", ")}] has ${this.shape.length} axes but ${this.names.length} names ` +
      `(${this.names.join(", ")}) were given: give one name per axis`
    )
  }
}

export class DuplicateMeshAxis extends Schema.TaggedError<DuplicateMeshAxis>()("DuplicateMeshAxis", {
  names: Schema.Array(Schema.String),
  axis: Schema.String,
}) {
  override get message() {
    return `mesh axis name "${this.axis}" appears more than once in (${this.names.join(", ")}): axis names must be unique`
  }
}

export type MeshError = InvalidMeshShape | MeshRankMismatch | DuplicateMeshAxis

export class Mesh {
  readonly size: number
  private readonly strides: number[]

  constructor(
    readonly shape: ReadonlyArray<number>,
    readonly axisNames: ReadonlyArray<string>,
    /** Backend device index of each mesh position, row-major. */
    readonly devices: ReadonlyArray<number>,
  ) {
    this.size = devices.length
    this.strides = shape.map((_, i) => shape.slice(i + 1).reduce((a, b) => a * b, 1))
  }

  hasAxis(name: string): boolean {
    return this.axisNames.includes(name)
  }

  /** The size of a named axis; 1 for a name this mesh does not have is never assumed: callers check hasAxis. */
  axisSize(name: string): number {
    const i = this.axisNames.indexOf(name)
    if (i < 0) throw new Error(`mesh has no axis ${name}`)
    return this.shape[i]!
  }

  /** Product of the sizes of several axes. */
  axesSize(names: ReadonlyArray<string>): number {
    return names.reduce((p, n) => p * this.axisSize(n), 1)
  }

  /** Mesh coordinates of a position (an index into `devices`). */
  coords(position: number): number[] {
    return this.shape.map((d, i) => Math.floor(position / this.strides[i]!) % d)
  }

  position(coords: ReadonlyArray<number>): number {
    return coords.reduce((p, c, i) => p + c * this.strides[i]!, 0)
  }

  /** Index of a position along several axes, the first axis most significant (JAX's order). */
  indexAlong(position: number, axes: ReadonlyArray<string>): number {
    const c = this.coords(position)
    let idx = 0
    for (const a of axes) {
      const i = this.axisNames.indexOf(a)
      idx = idx * this.shape[i]! + c[i]!
    }
    return idx
  }

  /**
   * The positions partitioned into groups that differ only along `axes`: the participants of a
   * collective over those axes. Each group is ordered by indexAlong(axes).
   */
  groups(axes: ReadonlyArray<string>): number[][] {
    const byKey = new Map<string, number[]>()
    const axisIdx = new Set(axes.map((a) => this.axisNames.indexOf(a)))
    for (let p = 0; p < this.size; p++) {
      const c = this.coords(p)
      const key = c.map((v, i) => (axisIdx.has(i) ? "*" : String(v))).join(",")
      const g = byKey.get(key)
      if (g) g.push(p)
      else byKey.set(key, [p])
    }
    return [...byKey.values()].map((g) =>
      g.sort((a, b) => this.indexAlong(a, axes) - this.indexAlong(b, axes)),
    )
  }

  toString(): string {
    return `Mesh(${this.axisNames.map((n, i) => `${n}=${this.shape[i]}`).join(", ")})`
  }
}

/**
 * Resolves a requested shape against a device count: at most one -1, which takes the devices
 * left over; the product must equal the count.
 */
export const resolveMeshShape = (
  shape: ReadonlyArray<number>,
  deviceCount: number,
): Effect.Effect<number[], InvalidMeshShape> =>
  Effect.suspend((): Effect.Effect<number[], InvalidMeshShape> => {
    const fail = (reason: string) =>
      Effect.fail(new InvalidMeshShape({ shape, devices: deviceCount, reason }))
    if (shape.length === 0) return fail("a mesh needs at least one axis")
    const wild = shape.filter((d) => d === -1).length
    if (wild > 1) return fail("only one -1 is allowed")
    if (shape.some((d) => d !== -1 && (!Number.isInteger(d) || d < 1)))
      return fail("every axis size must be a positive integer or -1")
    const known = shape.reduce((p, d) => (d === -1 ? p : p * d), 1)
    if (wild === 1) {
      if (deviceCount % known !== 0)
        return fail(`the other axes take ${known} devices, which does not divide ${deviceCount}`)
      return Effect.succeed(shape.map((d) => (d === -1 ? deviceCount / known : d)))
    }
    if (known !== deviceCount)
      return fail(
        `the axes multiply to ${known}; use sizes whose product is ${deviceCount}, or -1 for one axis`,
      )
    return Effect.succeed([...shape])
  })

/** A mesh over the given backend devices (all of them, row-major). */
export const makeMesh = (
  devices: ReadonlyArray<number>,
  shape: ReadonlyArray<number>,
  names: ReadonlyArray<string> = ["data", "model"],
): Effect.Effect<Mesh, MeshError> =>
  Effect.gen(function* () {
    if (shape.length !== names.length) return yield* new MeshRankMismatch({ shape, names })
    const seen = new Set<string>()
    for (const n of names) {
      if (seen.has(n)) return yield* new DuplicateMeshAxis({ names, axis: n })
      seen.add(n)
    }
    const resolved = yield* resolveMeshShape(shape, devices.length)
    return new Mesh(resolved, [...names], [...devices])
  })
