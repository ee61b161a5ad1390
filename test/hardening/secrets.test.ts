/**
 * HF_TOKEN never leaves the process except in the Authorization header to the Hub: with the token
 * set to a unique marker, a training run (checkpoints, metrics, HTML report, cache) and failing
 * Hub accesses against a server that echoes the token back in every answer write nothing, print
 * nothing and fail with no error that contains it.
 */
import { spawn } from "node:child_process"
import { randomBytes } from "node:crypto"
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs"
import { createServer, type Server } from "node:http"
import type { AddressInfo } from "node:net"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Cause, Effect, Exit } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Hub } from "../../src/layers/Hub.ts"

const root = join(import.meta.dirname, "..", "..")
const marker = `hf_MagixSecret${randomBytes(12).toString("hex")}`
const base = mkdtempSync(join(tmpdir(), "magix-secrets-"))

/** A Hub that refuses everything and echoes whatever authorization it was sent, everywhere it can. */
let server: Server
let endpoint = ""
const seen: string[] = []
beforeAll(async () => {
  server = createServer((req, res) => {
    const auth = req.headers.authorization ?? ""
    seen.push(auth)
    const status = req.url?.includes("/resolve/") ? 404 : 401
    res.writeHead(status, {
      "content-type": "application/json",
      "x-error-code": status === 404 ? "EntryNotFound" : "GatedRepo",
      "x-error-message": `token ${auth} may not read ${req.url}`,
    })
    res.end(JSON.stringify({ error: `Invalid credentials in Authorization header: ${auth}` }))
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
})
afterAll(async () => {
  await new Promise<void>((resolve) => server.close(() => resolve()))
  rmSync(base, { recursive: true, force: true })
})

/** Every file under `dir` (links not followed) that holds the marker. */
const filesHoldingMarker = (dir: string): string[] =>
  readdirSync(dir, { recursive: true })
    .map((f) => join(dir, String(f)))
    .filter((p) => statSync(p, { throwIfNoEntry: false })?.isFile() && readFileSync(p).includes(marker))

const env = (home: string): NodeJS.ProcessEnv => ({
  ...process.env,
  HF_TOKEN: marker,
  HF_HOME: home,
  HF_ENDPOINT: endpoint,
  HF_HUB_OFFLINE: "0",
})

/** Runs the command in a child process; asynchronously, as the refusing Hub answers from this one. */
const magix = (args: string[], home: string) =>
  new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve, reject) => {
    const child = spawn(process.execPath, [join(root, "bin", "magix.js"), ...args], {
      cwd: root,
      env: env(home),
      stdio: ["ignore", "pipe", "pipe"],
    })
    let stdout = ""
    let stderr = ""
    child.stdout.on("data", (d) => {
      stdout += String(d)
    })
    child.stderr.on("data", (d) => {
      stderr += String(d)
    })
    const timer = setTimeout(() => child.kill("SIGKILL"), 120_000)
    child.on("error", reject)
    child.on("close", (status) => {
      clearTimeout(timer)
      resolve({ status, stdout, stderr })
    })
  })

describe("HF_TOKEN", () => {
  it("appears in nothing a training run writes or prints: checkpoints, metrics, report, logs", async () => {
    const dir = join(base, "train")
    const home = join(base, "home-train")
    const r = await magix(
      [
        "train",
        "--checkpoint-dir",
        dir,
        "--metrics-file",
        join(dir, "metrics.jsonl"),
        "--report",
        join(dir, "report.html"),
        "--max-steps",
        "3",
        "--save-steps",
        "2",
        "--batch-size",
        "32",
        "--max-length",
        "16",
        "--mesh-shape",
        "2",
        "1",
        "--cpu-devices",
        "2",
      ],
      home,
    )
    expect(r.status, r.stderr).toBe(0)
    expect(readdirSync(dir)).toEqual(expect.arrayContaining(["2", "3", "metrics.jsonl", "report.html"]))
    expect(r.stdout + r.stderr).not.toContain(marker)
    expect(filesHoldingMarker(dir)).toEqual([])
    expect(filesHoldingMarker(base)).toEqual([])
  }, 160_000)

  it("appears in no error, log line or file when the Hub refuses and echoes it back", async () => {
    const dir = join(base, "refused")
    const home = join(base, "home-refused")
    const prompts = join(base, "prompts.txt")
    writeFileSync(prompts, "1 + 1 =\n")
    const runs = [
      [
        "train",
        "--model-name",
        "org/private-model",
        "--train-file",
        join(root, "examples", "tiny", "addition.jsonl"),
        "--checkpoint-dir",
        dir,
        "--max-steps",
        "1",
        "--cpu-devices",
        "2",
      ],
      [
        "train",
        "--train-file",
        "org/private-dataset",
        "--checkpoint-dir",
        dir,
        "--max-steps",
        "1",
        "--cpu-devices",
        "2",
      ],
      ["generate", "--model-name-or-path", "org/private-model", "--prompts", prompts, "--cpu-devices", "2"],
    ]
    for (const args of runs) {
      const r = await magix(args, home)
      expect(r.status, args.join(" ")).not.toBe(0)
      expect(r.stdout + r.stderr, args.join(" ")).not.toContain(marker)
      // It failed at the Hub, which refused (not on some earlier mistake).
      expect(r.stderr, args.join(" ")).toMatch(/org\/private-(model|dataset)/)
      if (process.env.MAGIX_SECRETS_DEBUG)
        process.stdout.write(`${args[0]} ${args[1]}: ${r.stderr.trim().split("\n").at(-1)}\n`)
    }
    // The token did reach the Hub (so it was in play), and only there.
    expect(seen.some((a) => a.includes(marker))).toBe(true)
    expect(filesHoldingMarker(base)).toEqual([])
  }, 160_000)

  it("appears in no typed error or defect of the Hub service, whatever the server says", async () => {
    const hub = Hub.layerWith(
      { HF_TOKEN: marker, HF_HOME: join(base, "home-layer"), HF_ENDPOINT: endpoint },
      { maxRetries: 0 },
    )
    for (const call of [
      (h: Hub["Service"]) => h.resolveFile("org/private-model", "config.json"),
      (h: Hub["Service"]) => h.snapshot("org/private-model"),
      (h: Hub["Service"]) => h.listFiles("org/private-data", { repoType: "dataset" }),
    ]) {
      const exit = await Effect.runPromiseExit(
        Effect.gen(function* () {
          return yield* call(yield* Hub)
        }).pipe(Effect.provide(hub)),
      )
      expect(Exit.isFailure(exit)).toBe(true)
      if (Exit.isFailure(exit)) {
        const text = `${Cause.pretty(exit.cause)} ${JSON.stringify(Cause.findErrorOption(exit.cause))}`
        expect(text).not.toContain(marker)
      }
    }
  })
})
