/**
 * Saves checkpoints in a loop until killed (for crash.test.ts). Step s holds `w` [256, 1024]
 * float32 sharded over data (w[i] = s * 1000 + i % 997) and `b` [1024] replicated (b[i] = -s),
 * so a restored step can be checked bit-exactly; retention deletes old steps as it goes.
 * Prints "ready" once, then "saved <step>" after each save is on disk.
 * Usage: node --import tsx crashChild.ts <directory>
 */
import { resolve } from "node:path"
import { pathToFileURL } from "node:url"
import { Effect, Layer, Option } from "effect"
import { makeMesh } from "../../src/core/mesh.ts"
import { fromHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { Checkpointer } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"

export const weights = (step: number) =>
  Float32Array.from({ length: 256 * 1024 }, (_, i) => step * 1000 + (i % 997))
export const biases = (step: number) => new Float32Array(1024).fill(-step)

// Run only as the program (crash.test.ts imports the data above).
const isMain =
  process.argv[1] !== undefined && import.meta.url === pathToFileURL(resolve(process.argv[1])).href
const directory = process.argv[2]
if (isMain && directory) {
  const program = Effect.gen(function* () {
    const ckpt = yield* Checkpointer
    const { engine } = yield* Devices
    const mesh = yield* makeMesh([0, 1], [2, 1])
    let step = Option.getOrElse(yield* ckpt.latestStep, () => 0) + 1
    process.stdout.write("ready\n")
    for (;;) {
      const w = yield* fromHost(
        engine,
        weights(step),
        [256, 1024],
        "float32",
        new NamedSharding(mesh, P("data")),
      )
      const b = yield* fromHost(engine, biases(step), [1024], "float32", new NamedSharding(mesh, P()))
      yield* ckpt.save(step, { params: { w, b } }, { dataPosition: { step } })
      yield* ckpt.wait
      process.stdout.write(`saved ${step}\n`)
      w.dispose()
      b.dispose()
      step++
    }
  })
  Effect.runPromise(
    program.pipe(
      Effect.provide(Checkpointer.layer({ directory, maxToKeep: 3 })),
      Effect.scoped,
      Effect.provide(Layer.mergeAll(CpuRuntime({ devices: 2 }))),
    ),
  )
}
