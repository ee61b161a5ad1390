/** Benchmark results: a table on stdout and JSON (device, date, commit) under bench/results/. */
import { execSync } from "node:child_process"
import { mkdirSync, writeFileSync } from "node:fs"
import { cpus } from "node:os"
import { join } from "node:path"

/** The commit measured: MAGIX_COMMIT where the tree is a copy without .git (the GPU host). */
export const commit = (): string => {
  if (process.env.MAGIX_COMMIT) return process.env.MAGIX_COMMIT
  try {
    return execSync("git rev-parse --short HEAD", { encoding: "utf8" }).trim()
  } catch {
    return "unknown"
  }
}

export const cpuName = (): string => `${cpus()[0]?.model ?? "cpu"} (${cpus().length} cores)`

export const printTable = (rows: ReadonlyArray<Record<string, string | number | undefined>>): void => {
  // Every column any row has, in first-seen order; a row without one shows a blank cell.
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))]
  const cell = (v: string | number | undefined) =>
    v === undefined ? "" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(2)) : v
  const width = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)))
  const line = (vals: string[]) => vals.map((v, i) => v.padStart(width[i]!)).join("  ")
  console.log(line(cols))
  console.log(line(width.map((w) => "-".repeat(w))))
  for (const r of rows) console.log(line(cols.map((c) => cell(r[c]))))
}

export const writeResult = (name: string, device: string, body: Record<string, unknown>): string => {
  const date = new Date().toISOString()
  const dir = join(import.meta.dirname, "results")
  mkdirSync(dir, { recursive: true })
  const path = join(dir, `${name}-${date.slice(0, 10)}.json`)
  writeFileSync(
    path,
    `${JSON.stringify({ benchmark: name, device, date, commit: commit(), ...body }, null, 2)}\n`,
  )
  return path
}
