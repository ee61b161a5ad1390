/**
 * The manifest of a checkpoint step: everything exact resume needs besides the arrays (step, data
 * position, RNG state, model config, mesh, partition rules, library version) and the list of the
 * arrays saved, with their shapes, dtypes and saving specs. It is written last, so a step
 * directory without one is never complete.
 */
import { Schema } from "effect"

export const SavedArray = Schema.Struct({
  /** Item and tree path: "params/model.layers.0.mlp.up_proj.weight". */
  path: Schema.String,
  shape: Schema.Array(Schema.Number),
  dtype: Schema.String,
  /** The spec it was saved from, as JSON (null | axis | axes per dimension). */
  spec: Schema.Array(Schema.NullOr(Schema.Union([Schema.String, Schema.Array(Schema.String)]))),
})
export type SavedArray = typeof SavedArray.Type

export const CheckpointManifest = Schema.Struct({
  format: Schema.Literal("magix-checkpoint-1"),
  step: Schema.Number,
  library: Schema.String,
  createdAt: Schema.String,
  mesh: Schema.Struct({ shape: Schema.Array(Schema.Number), axisNames: Schema.Array(Schema.String) }),
  rules: Schema.Array(
    Schema.Tuple([
      Schema.String,
      Schema.Array(Schema.NullOr(Schema.Union([Schema.String, Schema.Array(Schema.String)]))),
    ]),
  ),
  items: Schema.Array(Schema.String),
  arrays: Schema.Array(SavedArray),
  /** Opaque to the checkpointer: the batch stream's position, the RNG seed, the model config. */
  dataPosition: Schema.optional(Schema.Unknown),
  rng: Schema.optional(Schema.Unknown),
  modelConfig: Schema.optional(Schema.Unknown),
  extras: Schema.optional(Schema.Record(Schema.String, Schema.Unknown)),
})
export type CheckpointManifest = typeof CheckpointManifest.Type

export const MANIFEST_FILE = "manifest.json"
