/** The `magix` command. */
import { readFileSync } from "node:fs"
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Effect } from "effect"
import { Command } from "effect/cli"
import { normalizeArgv } from "./argv.ts"
import { convertCommand } from "./convert.ts"
import { generateCommand } from "./generate.ts"
import { reportCommand } from "./reportCommand.ts"
import { teardown, watchSignals } from "./signals.ts"
import { trainCommand } from "./train.ts"

const version = (
  JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version: string }
).version

export const magix = Command.make("magix").pipe(
  Command.withDescription("train and run LLMs with data and model parallelism over a named device mesh"),
  Command.withSubcommands([trainCommand, generateCommand, convertCommand, reportCommand]),
)

watchSignals()
Command.runWith(magix, { version })(normalizeArgv(process.argv.slice(2))).pipe(
  Effect.provide(NodeServices.layer),
  NodeRuntime.runMain({ teardown }),
)
