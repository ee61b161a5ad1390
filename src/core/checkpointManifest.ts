/**
 * The manifest of a checkpoint step, and where each array of a step lives.
 *
 * The manifest holds everything exact resume needs besides the arrays (step, data position, RNG
 * state, model config, mesh, partition rules, library version) and the list of the arrays saved,
 * with their shapes, dtypes and saving specs. It is written last, so a step directory without a
 * valid one is never a checkpoint.
 *
 * Layout of a step (one Zarr v3 group; zarrita, zarr-python and tensorstore open it):
 *
 *     <root>/<step>/zarr.json                          group
 *     <root>/<step>/manifest.json
 *     <root>/<step>/<item>/zarr.json                   group ("params", "optState", …)
 *     <root>/<step>/<item>/<leaf path>/zarr.json       array, e.g. params/model.layers.0.mlp.up_proj.weight
 *     <root>/<step>/<item>/<leaf path>/c/<i>/<j>       one chunk per distinct saved device block
 *
 * A leaf's tree path ("model.layers.0.mlp.up_proj.weight", keys joined by ".") is one folder, not
 * nested folders: Hugging Face names stay greppable, a leaf can never be the parent of another
 * node, and a path is checked as a single name. An item that is itself an array is the array.
 */
import { Schema } from "effect"
import { dtypes } from "./dtype.ts"

/** A PartitionSpec as JSON: per dimension null, an axis name, or several axis names. */
export const SpecJson = Schema.Array(
  Schema.NullOr(Schema.Union([Schema.String, Schema.Array(Schema.String)])),
)
export type SpecJson = typeof SpecJson.Type

export const DTypeName = Schema.Literals(dtypes)

export const SavedArray = Schema.Struct({
  /** Item and tree path: "params/model.layers.0.mlp.up_proj.weight" (just the item for an array item). */
  path: Schema.String,
  shape: Schema.Array(Schema.Number),
  dtype: DTypeName,
  /** The spec it was saved from, padded to the rank. */
  spec: SpecJson,
  /** The chunk shape on disk: the block each device held when saved. */
  chunkShape: Schema.optional(Schema.Array(Schema.Number)),
})
export type SavedArray = typeof SavedArray.Type

export const CheckpointManifest = Schema.Struct({
  format: Schema.Literal("magix-checkpoint-1"),
  step: Schema.Number,
  /** The library that wrote it ("magix-ts 0.1.0"). */
  library: Schema.String,
  createdAt: Schema.String,
  mesh: Schema.Struct({ shape: Schema.Array(Schema.Number), axisNames: Schema.Array(Schema.String) }),
  /** The partition rules in force: [regex source, spec]. */
  rules: Schema.Array(Schema.Tuple([Schema.String, SpecJson])),
  items: Schema.Array(Schema.String),
  arrays: Schema.Array(SavedArray),
  /** Opaque to the checkpointer: the batch stream's position, the RNG state, the model config. */
  dataPosition: Schema.optional(Schema.Unknown),
  rng: Schema.optional(Schema.Unknown),
  modelConfig: Schema.optional(Schema.Unknown),
  extras: Schema.optional(Schema.Record(Schema.String, Schema.Unknown)),
})
export type CheckpointManifest = typeof CheckpointManifest.Type

export const MANIFEST_FILE = "manifest.json"
export const MANIFEST_FORMAT = "magix-checkpoint-1"

/** Names that the layout itself uses at some level, so no item or leaf may take them. */
const reserved = new Set(["zarr.json", MANIFEST_FILE])
const safeName = /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/

/**
 * Why `name` (an item name or a leaf's tree path) cannot be a folder of a step, or undefined
 * where it can. Names come from trees on save and from callers (or a manifest) on restore, so
 * they are untrusted: only letters, digits, '_', '.', '-', no "..", no leading '.' or '-', not a
 * reserved name, no Zarr-reserved "__" prefix, at most 255 bytes. Nothing passing this can
 * leave the step directory.
 */
export const checkpointNameProblem = (name: string): string | undefined => {
  if (name === "") return "it is empty"
  if (!safeName.test(name))
    return "only letters, digits, '_', '.' and '-' are allowed, and not first '.' or '-'"
  if (name.includes("..")) return 'it contains ".."'
  if (name.startsWith("__")) return 'names starting with "__" are reserved by Zarr'
  if (reserved.has(name)) return `"${name}" is a name the checkpoint layout uses`
  if (name.length > 255) return "it is longer than 255 characters"
  return undefined
}

/** The path of an array inside the step ("params/model.norm.weight"; "step" for an array item). */
export const arrayPath = (item: string, leafPath: string): string =>
  leafPath === "" ? item : `${item}/${leafPath}`

/** A step's folder name: the step in decimal, as orbax names them. */
export const stepDirectoryName = (step: number): string => String(step)

/** The step a folder name denotes, or undefined for anything else (temporary folders included). */
export const stepOfDirectoryName = (name: string): number | undefined =>
  /^(0|[1-9]\d{0,15})$/.test(name) && Number.isSafeInteger(Number(name)) ? Number(name) : undefined

/** Folders a save or a deletion works in: `<step>.tmp-<random>`; never a checkpoint, removed on start. */
export const isTemporaryName = (name: string): boolean => /^\d+\.tmp-[A-Za-z0-9-]+$/.test(name)
