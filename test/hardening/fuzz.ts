/**
 * Shared pieces of the fuzz tests: how many inputs to try (MAGIX_FUZZ_RUNS for a long run),
 * mutations of real files (bytes and JSON structure), and the one property every parser owes
 * us: an input gives a result or a typed error, never a defect, an untyped throw or a hang.
 */
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Cause, Effect, Exit, type Layer, ManagedRuntime } from "effect"
import fc from "fast-check"
import { afterAll, expect } from "vitest"

/**
 * Inputs per property: `fallback` in the default run, MAGIX_FUZZ_RUNS (a number, or a multiplier
 * written `x20`) for a long one. MAGIX_FUZZ_SEED replays a run.
 */
export const fuzzRuns = (fallback: number): number => {
  const env = process.env.MAGIX_FUZZ_RUNS?.trim()
  if (env === undefined || env === "") return fallback
  const n = env.startsWith("x") ? fallback * Number(env.slice(1)) : Number(env)
  return Number.isFinite(n) && n > 0 ? Math.round(n) : fallback
}

/** fast-check parameters for one fuzz property; a fixed seed keeps the default run repeatable. */
export const fuzzParams = (fallback: number): fc.Parameters<unknown> => ({
  numRuns: fuzzRuns(fallback),
  seed: process.env.MAGIX_FUZZ_SEED !== undefined ? Number(process.env.MAGIX_FUZZ_SEED) : 0x5eed,
  endOnFailure: true,
})

/** Inputs tried per parser in this process, printed at the end of a long run (and by the ASan run). */
export const tried = new Map<string, number>()
export const count = (parser: string) => tried.set(parser, (tried.get(parser) ?? 0) + 1)
export const reportCounts = () => {
  if (process.env.MAGIX_FUZZ_REPORT)
    for (const [parser, n] of [...tried].sort()) process.stdout.write(`fuzz-count ${parser} ${n}\n`)
}

// ---------------------------------------------------------------------------------------------
// The property

const isTagged = (e: unknown): e is { readonly _tag: string; readonly message: string } =>
  e instanceof Error && typeof (e as { _tag?: unknown })._tag === "string"

/**
 * Runs `effect` with a time limit and checks its outcome: success, or a failure whose error is a
 * tagged error with one of `tags` and a message. A defect, an interruption or a timeout throws
 * (failing the property with the input that caused it).
 */
export const settle = async <A, E, R = never>(
  effect: Effect.Effect<A, E, R>,
  tags: ReadonlyArray<string>,
  options: {
    readonly timeoutMs?: number
    /** Runs the effect (a ManagedRuntime's runPromiseExit where it needs services). */
    readonly run?: (e: Effect.Effect<A, E, R>) => Promise<Exit.Exit<A, unknown>>
  } = {},
): Promise<Exit.Exit<A, unknown>> => {
  const timeoutMs = options.timeoutMs ?? 5_000
  const run = options.run ?? ((e: Effect.Effect<A, E, R>) => Effect.runPromiseExit(e as Effect.Effect<A, E>))
  const exit: Exit.Exit<A, unknown> = await run(
    effect.pipe(
      Effect.timeoutOrElse({ duration: timeoutMs, orElse: () => Effect.die(new HungError(timeoutMs)) }),
    ),
  )
  if (Exit.isSuccess(exit)) return exit
  const failure = Cause.findErrorOption(exit.cause)
  if (failure._tag === "None" || Cause.hasDies(exit.cause) || Cause.hasInterrupts(exit.cause))
    throw new Error(`not a typed failure:\n${Cause.pretty(exit.cause)}`)
  const e = failure.value
  if (!isTagged(e)) throw new Error(`an untagged failure: ${String(e)}`)
  if (!tags.includes(e._tag)) throw new Error(`unexpected error ${e._tag}: ${e.message}`)
  expect(e.message.length).toBeGreaterThan(0)
  return exit
}

class HungError extends Error {
  constructor(ms: number) {
    super(`no answer within ${ms} ms: a hang`)
  }
}

/** As `settle` for code that throws: a throw must be a tagged error of `tags`. */
export const settleSync = <A>(
  f: () => A,
  tags: ReadonlyArray<string>,
): { ok: true; value: A } | { ok: false } => {
  try {
    return { ok: true, value: f() }
  } catch (e) {
    if (!isTagged(e))
      throw new Error(`an untyped throw: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`)
    if (!tags.includes(e._tag)) throw new Error(`unexpected error ${e._tag}: ${e.message}`)
    return { ok: false }
  }
}

// ---------------------------------------------------------------------------------------------
// Byte mutations

type ByteOp =
  | { readonly op: "flip"; readonly at: number; readonly bit: number }
  | { readonly op: "set"; readonly at: number; readonly value: number }
  | { readonly op: "insert"; readonly at: number; readonly bytes: Uint8Array }
  | { readonly op: "delete"; readonly at: number; readonly length: number }
  | { readonly op: "truncate"; readonly at: number }
  | { readonly op: "u64"; readonly at: number; readonly value: bigint }
  | { readonly op: "repeat"; readonly at: number; readonly length: number; readonly times: number }

/** Bytes that mean something to the formats under test: JSON punctuation, digits, edges. */
const interestingBytes = [
  0, 1, 0x7f, 0x80, 0xff, 0x22, 0x7b, 0x7d, 0x5b, 0x5d, 0x2c, 0x3a, 0x2d, 0x39, 0x65, 0x2e, 0x2f, 0x0a, 0x5c,
]
const interestingU64 = [
  0n,
  1n,
  7n,
  8n,
  2n ** 31n,
  2n ** 32n - 1n,
  2n ** 53n,
  2n ** 63n,
  2n ** 64n - 1n,
  100_000_001n,
]

const byteOp: fc.Arbitrary<ByteOp> = fc.oneof(
  fc.record({ op: fc.constant("flip" as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({
    op: fc.constant("set" as const),
    at: fc.nat(),
    value: fc.oneof(fc.constantFrom(...interestingBytes), fc.integer({ min: 0, max: 255 })),
  }),
  fc.record({
    op: fc.constant("insert" as const),
    at: fc.nat(),
    bytes: fc.uint8Array({ minLength: 1, maxLength: 16 }),
  }),
  fc.record({ op: fc.constant("delete" as const), at: fc.nat(), length: fc.integer({ min: 1, max: 64 }) }),
  fc.record({ op: fc.constant("truncate" as const), at: fc.nat() }),
  fc.record({ op: fc.constant("u64" as const), at: fc.nat(), value: fc.constantFrom(...interestingU64) }),
  fc.record({
    op: fc.constant("repeat" as const),
    at: fc.nat(),
    length: fc.integer({ min: 1, max: 32 }),
    times: fc.integer({ min: 2, max: 8 }),
  }),
)

const applyByteOp = (b: Uint8Array, o: ByteOp, region: number): Uint8Array => {
  const span = Math.max(1, Math.min(region, b.length))
  const at = o.at % span
  switch (o.op) {
    case "flip": {
      if (b.length === 0) return b
      const out = b.slice()
      out[at % out.length]! ^= 1 << o.bit
      return out
    }
    case "set": {
      if (b.length === 0) return b
      const out = b.slice()
      out[at % out.length] = o.value
      return out
    }
    case "insert":
      return concat(b.subarray(0, at), o.bytes, b.subarray(at))
    case "delete":
      return concat(b.subarray(0, at), b.subarray(at + o.length))
    case "truncate":
      return b.subarray(0, at)
    case "u64": {
      if (b.length < 8) return b
      const out = b.slice()
      new DataView(out.buffer).setBigUint64(Math.min(at, out.length - 8), o.value, true)
      return out
    }
    case "repeat": {
      const piece = b.subarray(at, at + o.length)
      return concat(
        b.subarray(0, at),
        ...Array.from({ length: o.times }, () => piece),
        b.subarray(at + o.length),
      )
    }
  }
}

const concat = (...parts: Uint8Array[]): Uint8Array => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0))
  let off = 0
  for (const p of parts) {
    out.set(p, off)
    off += p.length
  }
  return out
}

/**
 * One to four byte mutations of `seed`; positions fall in the first `region` bytes (the header of
 * a binary format, where a parser's decisions are) unless `region` is omitted.
 */
export const mutatedBytes = (seed: Uint8Array, region: number = seed.length): fc.Arbitrary<Uint8Array> =>
  fc
    .array(byteOp, { minLength: 1, maxLength: 4 })
    .map((ops) => ops.reduce((b, o) => applyByteOp(b, o, region), seed))

/** As `mutatedBytes`, positions counted from the end (Parquet keeps its metadata there). */
export const mutatedTail = (seed: Uint8Array, tail: number): fc.Arbitrary<Uint8Array> =>
  fc.array(byteOp, { minLength: 1, maxLength: 4 }).map((ops) =>
    ops.reduce((b, o) => {
      const start = Math.max(0, b.length - tail)
      return concat(b.subarray(0, start), applyByteOp(b.subarray(start), o, tail))
    }, seed),
  )

// ---------------------------------------------------------------------------------------------
// JSON mutations

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json }

const interestingNumbers = [
  0,
  -0,
  -1,
  1,
  2,
  0.5,
  -0.5,
  1e-300,
  3.5,
  255,
  256,
  2 ** 31,
  2 ** 32,
  2 ** 53,
  2 ** 53 + 2,
  2 ** 64,
  1e21,
  1e308,
  -1e308,
  Number.MAX_SAFE_INTEGER,
  Number.MIN_SAFE_INTEGER,
]
const interestingStrings = [
  "",
  ".",
  "..",
  "../x",
  "../../../../etc/passwd",
  "/etc/passwd",
  "a/../../b",
  "C:\\Windows",
  "a\\..\\b",
  "\u0000",
  "x\u0000y",
  "__proto__",
  "constructor",
  "__metadata__",
  "F32",
  "BF16",
  "I64",
  "U64",
  "BOOL",
  "float32",
  "bfloat16",
  "NaN",
  "Infinity",
  "-Infinity",
  "0x7fc00000",
  "llama",
  "gemma",
  "mistral",
  "llama3",
  "default",
  "\ud800",
  "é".repeat(40),
  "{{ raise_exception('x') }}",
  "{% for x in y %}",
  "model.safetensors",
  "c/0/0",
]
const interestingJson: fc.Arbitrary<Json> = fc.oneof(
  fc.constantFrom<Json>(null, true, false, [], {}, [[]], [0], [0, 0], [-1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9]),
  fc.constantFrom<Json>(...interestingNumbers),
  fc.constantFrom<Json>(...interestingStrings),
  fc.constantFrom<Json>(
    "x".repeat(70_000),
    Array.from({ length: 40 }, () => 2 ** 20),
  ),
)
const anyJson: fc.Arbitrary<Json> = fc.oneof(
  { weight: 3, arbitrary: interestingJson },
  { weight: 1, arbitrary: fc.jsonValue({ maxDepth: 2 }) as fc.Arbitrary<Json> },
)

type JsonOp =
  | { readonly op: "replace"; readonly at: number; readonly value: Json }
  | { readonly op: "delete"; readonly at: number }
  | { readonly op: "rename"; readonly at: number; readonly key: string }
  | { readonly op: "wrap"; readonly at: number }
  | { readonly op: "add"; readonly at: number; readonly key: string; readonly value: Json }
  | { readonly op: "copy"; readonly at: number; readonly from: number }

const keyArb = fc.oneof(fc.constantFrom(...interestingStrings), fc.string({ maxLength: 8 }))
const jsonOp: fc.Arbitrary<JsonOp> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ op: fc.constant("replace" as const), at: fc.nat(), value: anyJson }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("delete" as const), at: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("rename" as const), at: fc.nat(), key: keyArb }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("wrap" as const), at: fc.nat() }) },
  {
    weight: 1,
    arbitrary: fc.record({ op: fc.constant("add" as const), at: fc.nat(), key: keyArb, value: anyJson }),
  },
  { weight: 1, arbitrary: fc.record({ op: fc.constant("copy" as const), at: fc.nat(), from: fc.nat() }) },
)

type Path = ReadonlyArray<string | number>

const pathsOf = (v: Json, at: Path = [], out: Path[] = []): Path[] => {
  out.push(at)
  if (Array.isArray(v)) v.forEach((x, i) => pathsOf(x, [...at, i], out))
  else if (v !== null && typeof v === "object")
    for (const [k, x] of Object.entries(v)) pathsOf(x, [...at, k], out)
  return out
}

const get = (root: Json, path: Path): Json =>
  path.reduce<Json>((v, k) => (v as Record<string, Json>)[k]!, root)

/** Applies `op` to a deep copy of `root` (keys keep their order; a renamed key stays in place). */
const applyJsonOp = (root: Json, op: JsonOp): Json => {
  const paths = pathsOf(root)
  const path = paths[op.at % paths.length]!
  const edit = (v: Json, depth: number, f: (parentValue: Json, key: string | number) => Json): Json => {
    const k = path[depth]!
    if (depth === path.length - 1) return f(v, k)
    if (Array.isArray(v)) return v.map((x, i) => (i === k ? edit(x, depth + 1, f) : x))
    return Object.fromEntries(
      Object.entries(v as Record<string, Json>).map(([key, x]) => [
        key,
        key === k ? edit(x, depth + 1, f) : x,
      ]),
    )
  }
  const atParent = (f: (parent: Json, key: string | number) => Json) =>
    path.length === 0 ? root : edit(root, 0, f)
  const setChild = (parent: Json, key: string | number, value: Json | undefined): Json => {
    if (Array.isArray(parent)) {
      const out = [...parent]
      if (value === undefined) out.splice(key as number, 1)
      else out[key as number] = value
      return out
    }
    const entries = Object.entries(parent as Record<string, Json>)
    return Object.fromEntries(
      value === undefined
        ? entries.filter(([k]) => k !== key)
        : entries.map(([k, x]) => [k, k === key ? value : x]),
    )
  }
  switch (op.op) {
    case "replace":
      return path.length === 0 ? op.value : atParent((p, k) => setChild(p, k, op.value))
    case "delete":
      return path.length === 0 ? null : atParent((p, k) => setChild(p, k, undefined))
    case "wrap":
      return path.length === 0 ? [root] : atParent((p, k) => setChild(p, k, [get(root, path)]))
    case "copy": {
      const from = get(root, paths[op.from % paths.length]!)
      return path.length === 0 ? from : atParent((p, k) => setChild(p, k, from))
    }
    case "rename":
      return path.length === 0 || typeof path[path.length - 1] === "number"
        ? root
        : atParent((p, k) =>
            Object.fromEntries(
              Object.entries(p as Record<string, Json>).map(([key, x]) => [key === k ? op.key : key, x]),
            ),
          )
    case "add": {
      const target = get(root, path)
      if (target === null || typeof target !== "object" || Array.isArray(target)) return root
      const added: Json = Object.fromEntries([...Object.entries(target), [op.key, op.value]])
      return path.length === 0 ? added : atParent((p, k) => setChild(p, k, added))
    }
  }
}

/** One to three structural mutations of a JSON document, as text. */
export const mutatedJson = (seed: Json): fc.Arbitrary<string> =>
  fc.array(jsonOp, { minLength: 1, maxLength: 3 }).map((ops) => JSON.stringify(ops.reduce(applyJsonOp, seed)))

/** A JSON file mutated either structurally or byte-wise (as text). */
export const mutatedJsonText = (text: string): fc.Arbitrary<string> =>
  fc.oneof(
    { weight: 3, arbitrary: mutatedJson(JSON.parse(text) as Json) },
    {
      weight: 1,
      arbitrary: mutatedBytes(new TextEncoder().encode(text)).map((b) => Buffer.from(b).toString("utf8")),
    },
  )

/**
 * A fuzz file's temporary folder, removed after its tests, which then report their counts. With
 * `layer` (given the folder), a runtime for the parsers that need services, disposed first.
 */
export function fuzzWorkspace(prefix: string): { readonly dir: string }
export function fuzzWorkspace<R, E>(
  prefix: string,
  layer: (dir: string) => Layer.Layer<R, E>,
): { readonly dir: string; readonly runtime: ManagedRuntime.ManagedRuntime<R, E> }
export function fuzzWorkspace<R, E>(prefix: string, layer?: (dir: string) => Layer.Layer<R, E>) {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  const runtime = layer ? ManagedRuntime.make(layer(dir)) : undefined
  afterAll(async () => {
    reportCounts()
    await runtime?.dispose()
    rmSync(dir, { recursive: true, force: true })
  })
  return runtime ? { dir, runtime } : { dir }
}
