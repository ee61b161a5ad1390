/**
 * The magix command end to end: help, training the embedded model with checkpoints and metrics,
 * resuming after the process was killed mid-run (identical to a straight run), generation in
 * input order, LoRA, convert, and errors as one line with the fix. In-process runs use mock
 * layers (CPU devices, the local Hub, temporary directories); a child process is killed for real.
 */
import { execFileSync, spawn } from "node:child_process"
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Layer, Option } from "effect"
import { describe, expect, it } from "vitest"
import { generateProgram } from "../../programs/generate.ts"
import { trainProgram } from "../../programs/train.ts"
import { Checkpointer } from "../../src/layers/Checkpointer.ts"
import { CpuRuntime } from "../../src/layers/Devices.ts"
import { Hub } from "../../src/layers/Hub.ts"
import { formatLearningRate, formatValue } from "../../src/layers/report/format.ts"
import { openSafetensors } from "../../src/layers/SafetensorsFile.ts"
import { embeddedTrainFile } from "../../src/layers/Training.ts"

const root = join(import.meta.dirname, "..", "..")
const magix = (args: string[], cwd = root) =>
  execFileSync(process.execPath, [join(root, "bin", "magix.js"), ...args], {
    cwd,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    // A hang fails the test instead of stalling the suite (a synchronous call cannot be interrupted).
    timeout: 120_000,
  })

const none = Option.none()
const trainFlags = (checkpointDir: string, extra: Record<string, unknown> = {}) => ({
  modelType: "llama" as const,
  modelName: none as Option.Option<string>,
  tokenizerName: none as Option.Option<string>,
  trainFile: none as Option.Option<string>,
  trainDataConfig: none as Option.Option<string>,
  split: "train",
  trainDataField: "text",
  useChatTemplate: false,
  checkpointDir: Option.some(checkpointDir),
  maxLength: Option.some(16),
  numEpochs: Option.some(3),
  batchSize: Option.some(32),
  learningRate: Option.some(5e-3),
  weightDecay: 1e-4,
  adamBeta1: 0.9,
  adamBeta2: 0.999,
  maxGradNorm: 1,
  saveSteps: 3,
  seed: 42,
  meshShape: "2,1",
  bf16ModelWeights: false,
  gradientCheckpointing: false,
  maxSteps: Option.some(8),
  cpuDevices: Option.some(2),
  metricsFile: none as Option.Option<string>,
  report: none as Option.Option<string>,
  packing: false,
  logEvery: 1,
  lora: false,
  loraRank: 4,
  loraAlpha: 16,
  ...extra,
})

const runTrain = (flags: ReturnType<typeof trainFlags>) =>
  Effect.runPromise(
    trainProgram(flags as Parameters<typeof trainProgram>[0]).pipe(
      Effect.scoped,
      Effect.provide(
        Checkpointer.layer({
          directory: Option.getOrThrow(flags.checkpointDir),
          saveInterval: flags.saveSteps,
        }).pipe(Layer.provideMerge(Layer.mergeAll(CpuRuntime({ devices: 2 }), Hub.layer))),
      ),
    ),
  )

const readParams = (dir: string) =>
  Effect.runPromise(
    Effect.scoped(
      Effect.gen(function* () {
        const f = yield* openSafetensors(join(dir, "model.safetensors"))
        const out: Record<string, number[]> = {}
        for (const n of f.names) out[n] = Array.from((yield* f.readTensor(n)) as Float32Array)
        return out
      }),
    ),
  )

describe("magix", () => {
  it("lists its commands and each command's flags", () => {
    const top = magix(["--help"])
    for (const c of ["train", "generate", "convert", "report"]) expect(top).toContain(c)
    const train = magix(["train", "--help"])
    for (const f of [
      "--model-type",
      "--mesh-shape",
      "--cpu-devices",
      "--metrics-file",
      "--lora",
      "--max-steps",
      "--save-steps",
      "--report",
    ])
      expect(train).toContain(f)
    expect(magix(["generate", "--help"])).toContain("--top-p")
    const report = magix(["report", "--help"])
    for (const f of ["--metrics-file", "--output"]) expect(report).toContain(f)
  })

  it("a mistake is one line with the fix and a non-zero exit", () => {
    let err: { status?: number; stderr?: string } = {}
    try {
      magix([
        "train",
        "--train-file",
        "/nonexistent/data.jsonl",
        "--max-steps",
        "1",
        "--checkpoint-dir",
        mkdtempSync(join(tmpdir(), "magix-cli-")),
      ])
    } catch (e) {
      err = e as typeof err
    }
    expect(err.status).toBe(1)
    const lines = (err.stderr ?? "")
      .trim()
      .split("\n")
      .filter((l) => l.startsWith("magix:"))
    expect(lines.at(-1)).toContain("/nonexistent/data.jsonl")
    expect(err.stderr).not.toContain("    at ")
  })

  it("a checkpoint directory that cannot be made is one line before any step, not a hang", () => {
    let err: { status?: number; stderr?: string } = {}
    const file = join(mkdtempSync(join(tmpdir(), "magix-cli-")), "a-file")
    writeFileSync(file, "")
    // Under /proc, Node 20's recursive mkdir spun forever; through a file it is ENOTDIR.
    for (const dir of ["/proc/magix-nope/x", join(file, "x")]) {
      try {
        magix(["train", "--max-steps", "2", "--checkpoint-dir", dir])
      } catch (e) {
        err = e as typeof err
      }
      expect(err.status).toBe(1)
      expect(err.stderr).toContain(`the checkpoint directory ${dir} cannot be created or written`)
      expect(err.stderr).not.toContain("step 1/")
    }
  })

  it("an --output-file that cannot be written is one line, before generating", () => {
    let err: { status?: number; stderr?: string } = {}
    try {
      magix([
        "generate",
        "--model-name-or-path",
        join(root, "test", "fixtures", "hf", "llama"),
        "--output-file",
        "/proc/magix-nope/out.jsonl",
      ])
    } catch (e) {
      err = e as typeof err
    }
    expect(err.status).toBe(1)
    expect(err.stderr).toContain("cannot write the generations to /proc/magix-nope/out.jsonl")
    expect(err.stderr).not.toContain("    at ")
  })

  it("trains with metrics and checkpoints; a run killed mid-way resumes to the same parameters as a straight run", async () => {
    const straight = mkdtempSync(join(tmpdir(), "magix-straight-"))
    await runTrain(trainFlags(straight, { metricsFile: Option.some(join(straight, "m.jsonl")) }))
    const lines = readFileSync(join(straight, "m.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l))
    expect(lines.map((l) => l.step)).toEqual([1, 2, 3, 4, 5, 6, 7, 8])
    expect(
      readdirSync(straight)
        .filter((n) => /^\d+$/.test(n))
        .sort(),
    ).toEqual(["3", "6", "8"])

    // The same run in a child process, killed once its first checkpoint exists.
    const killed = mkdtempSync(join(tmpdir(), "magix-killed-"))
    await new Promise<void>((resolve, reject) => {
      const child = spawn(
        process.execPath,
        [
          join(root, "bin", "magix.js"),
          "train",
          "--checkpoint-dir",
          killed,
          "--max-length",
          "16",
          "--num-epochs",
          "3",
          "--batch-size",
          "32",
          "--learning-rate",
          "5e-3",
          "--save-steps",
          "3",
          "--mesh-shape",
          "2",
          "1",
          "--cpu-devices",
          "2",
          "--max-steps",
          "8",
        ],
        { cwd: root, stdio: "ignore" },
      )
      const poll = setInterval(() => {
        if (existsSync(join(killed, "3", "manifest.json"))) {
          clearInterval(poll)
          child.kill("SIGKILL")
        }
      }, 20)
      child.on("exit", () => {
        clearInterval(poll)
        existsSync(join(killed, "3", "manifest.json"))
          ? resolve()
          : reject(new Error("the child ended before its first checkpoint"))
      })
    })
    expect(existsSync(join(killed, "hf"))).toBe(false)
    await runTrain(trainFlags(killed))
    expect(await readParams(join(killed, "hf"))).toEqual(await readParams(join(straight, "hf")))
  }, 180_000)

  it("generates for every prompt in input order, and LoRA trains an adapter that generate merges", async () => {
    const dir = mkdtempSync(join(tmpdir(), "magix-gen-"))
    await runTrain(trainFlags(dir, { maxSteps: Option.some(4) }))
    const prompts = join(dir, "prompts.txt")
    writeFileSync(prompts, "1+2=\n9+9=\n\n4+4=\n")
    const output = join(dir, "out.jsonl")
    const generate = (lora?: string) =>
      Effect.runPromise(
        generateProgram({
          prompts: Option.some(prompts),
          dataField: "text",
          hfDataConfig: none as Option.Option<string>,
          hfDataSplit: "test",
          useChatTemplate: false,
          batchSize: 3,
          padToMultipleOf: 8,
          sample: false,
          temperature: 0.7,
          topK: none as Option.Option<number>,
          topP: none as Option.Option<number>,
          seed: 1,
          maxLength: 14,
          modelType: "llama",
          modelNameOrPath: Option.some(join(dir, "hf")),
          tokenizerNameOrPath: none as Option.Option<string>,
          meshShape: "1,-1",
          outputFile: output,
          cpuDevices: none as Option.Option<number>,
          lora: lora ? Option.some(lora) : (none as Option.Option<string>),
        }).pipe(Effect.scoped, Effect.provide(Layer.mergeAll(CpuRuntime({ devices: 2 }), Hub.layer))),
      )
    await generate()
    const rows = readFileSync(output, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l))
    expect(rows.map((r) => r.prompt)).toEqual(["1+2=", "9+9=", "", "4+4="])
    for (const r of rows) expect(r.generated.startsWith(r.prompt)).toBe(true)

    const loraDir = mkdtempSync(join(tmpdir(), "magix-lora-"))
    await runTrain(
      trainFlags(loraDir, {
        lora: true,
        modelName: Option.some(join(dir, "hf")),
        trainFile: Option.some(embeddedTrainFile),
        maxSteps: Option.some(3),
        saveSteps: 3,
      }),
    )
    const manifest = JSON.parse(readFileSync(join(loraDir, "3", "manifest.json"), "utf8"))
    expect(manifest.items).toEqual(["lora", "optState"])
    expect(JSON.parse(readFileSync(join(loraDir, "lora", "adapter_config.json"), "utf8")).r).toBe(4)
    await generate(join(loraDir, "lora"))
    expect(readFileSync(output, "utf8").trim().split("\n")).toHaveLength(4)
  }, 180_000)

  it("--report writes a self-contained page of the run; `magix report` builds one from the metrics file, and a bad line is one error line", async () => {
    const dir = mkdtempSync(join(tmpdir(), "magix-report-"))
    const metricsFile = join(dir, "m.jsonl")
    const reportFile = join(dir, "pages", "run.html")
    await runTrain(
      trainFlags(dir, {
        maxSteps: Option.some(6),
        metricsFile: Option.some(metricsFile),
        report: Option.some(reportFile),
      }),
    )
    const logged = readFileSync(metricsFile, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { step: number; loss: number; learningRate: number })
    expect(logged.map((l) => l.step)).toEqual([1, 2, 3, 4, 5, 6])
    const vertices = (html: string, series: string) => {
      const m = html.match(new RegExp(`<path class="series ${series}"[^>]*data-points="(\\d+)" d="([^"]*)"`))
      return m ? [Number(m[1]), (m[2]!.match(/[ML]/g) ?? []).length] : undefined
    }
    // The steps card: "6 / 6" on the live page; a metrics file does not know the planned total.
    const checkPage = (html: string, steps: string) => {
      expect(html).not.toMatch(/\b(?:src|href)\s*=\s*["']?(?:https?:)?\/\//i)
      expect(html).not.toMatch(/<script\b|<link\b/i)
      expect(vertices(html, "s-loss")).toEqual([6, 6])
      expect(vertices(html, "s-lr")).toEqual([6, 6])
      for (const l of logged) expect(html).toContain(`<td>${formatLearningRate(l.learningRate)}</td>`)
      expect(html).toContain(`<div class="v">${steps}</div>`)
      expect(html).toContain(`<div class="v">${formatValue(logged.at(-1)!.loss)}</div>`)
    }
    const live = readFileSync(reportFile, "utf8")
    checkPage(live, "6 / 6")
    expect(live).toContain("status-finished")
    // The configuration: the flags as given, the model and the devices, and why there is no MFU.
    for (const s of ["--max-steps", "hidden size", "data=2", "cpu:0", "MFU not shown"])
      expect(live).toContain(s)

    const rebuilt = join(dir, "rebuilt.html")
    const said = execFileSync(
      process.execPath,
      [join(root, "bin", "magix.js"), "report", "--metrics-file", metricsFile, "--output", rebuilt],
      { cwd: root, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
    )
    expect(said).toBe("")
    const fromFile = readFileSync(rebuilt, "utf8")
    checkPage(fromFile, "6")
    expect(fromFile).toContain(metricsFile)

    const bad = join(dir, "bad.jsonl")
    const lines = readFileSync(metricsFile, "utf8").split("\n")
    lines.splice(3, 1, '{"step": 4, "loss": "high"}')
    writeFileSync(bad, lines.join("\n"))
    let err: { status?: number; stderr?: string } = {}
    try {
      magix(["report", "--metrics-file", bad])
    } catch (e) {
      err = e as typeof err
    }
    expect(err.status).toBe(1)
    const out = (err.stderr ?? "").trim().split("\n")
    expect(out).toHaveLength(1)
    expect(out[0]).toMatch(
      new RegExp(`^magix: ${bad.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}, line 4: .*"loss"`),
    )
    expect(existsSync(join(dir, "bad.html"))).toBe(false)
  }, 120_000)

  it("converts a checkpoint to the Hugging Face layout and back", async () => {
    const dir = mkdtempSync(join(tmpdir(), "magix-conv-"))
    magix([
      "train",
      "--checkpoint-dir",
      dir,
      "--max-steps",
      "2",
      "--save-steps",
      "2",
      "--batch-size",
      "32",
      "--max-length",
      "16",
    ])
    const out = join(dir, "exported")
    magix([
      "convert",
      "--checkpoint-dir",
      dir,
      "--output-dir",
      out,
      "--dtype",
      "bfloat16",
      "--max-shard-size",
      "500000",
    ])
    const index = JSON.parse(readFileSync(join(out, "model.safetensors.index.json"), "utf8"))
    const shards = [...new Set(Object.values(index.weight_map as Record<string, string>))].sort()
    expect(shards.length).toBeGreaterThan(1)
    expect(readdirSync(out).sort()).toEqual(["config.json", ...shards, "model.safetensors.index.json"].sort())
    const back = join(dir, "imported")
    magix(["convert", "--from-hf", out, "--checkpoint-dir", back])
    expect(existsSync(join(back, "0", "manifest.json"))).toBe(true)
    // Exporting the imported checkpoint again gives the same bf16 tensors: nothing lost either way.
    const again = join(dir, "again")
    magix(["convert", "--checkpoint-dir", back, "--output-dir", again, "--dtype", "bfloat16"])
    const tensors = async (d: string, files: string[]) => {
      const all: Record<string, string> = {}
      for (const file of files)
        await Effect.runPromise(
          Effect.scoped(
            Effect.gen(function* () {
              const f = yield* openSafetensors(join(d, file))
              for (const n of f.names) {
                const t = yield* f.readTensor(n)
                all[n] = Buffer.from(t.buffer, t.byteOffset, t.byteLength).toString("base64")
              }
            }),
          ),
        )
      return all
    }
    const first = await tensors(out, shards)
    expect(Object.keys(first).length).toBe(Object.keys(index.weight_map).length)
    expect(await tensors(again, ["model.safetensors"])).toEqual(first)
  }, 120_000)
})
