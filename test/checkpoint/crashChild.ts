/**
 * Saves checkpoints in a loop until killed (for crash.test.ts): step s holds arrays filled with s.
 * Usage: node --import tsx crashChild.ts <directory>
 */
import { Effect, Layer, Option } from "effect"
import { makeMesh } from "../../src/core/mesh.ts"
import { fromHost } from "../../src/core/shardedArray.ts"
import { NamedSharding, P } from "../../src/core/sharding.ts"
import { Checkpointer } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime, Devices } from "../../src/layers/Devices.ts"

const directory = process.argv[2]!
const program = Effect.gen(function* () {
  const ckpt = yield* Checkpointer
  const { engine } = yield* Devices
  const mesh = yield* makeMesh([0, 1], [2, 1])
  let step = Option.getOrElse(yield* ckpt.latestStep, () => 0) + 1
  process.stdout.write("ready\n")
  for (;;) {
    const w = yield* fromHost(
      engine,
      new Float32Array(256 * 1024).fill(step),
      [256, 1024],
      "float32",
      new NamedSharding(mesh, P("data")),
    )
    const b = yield* fromHost(
      engine,
      new Float32Array(1024).fill(-step),
      [1024],
      "float32",
      new NamedSharding(mesh, P()),
    )
    yield* ckpt.save(step, { params: { w, b } }, { dataPosition: { step } })
    yield* ckpt.wait
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
