/**
 * What a checkpoint's snapshot and restore are made of, each timed alone on this machine: copies
 * between host memory and device 0 (into memory already touched, and into fresh memory), crc32c
 * over host memory, and a cold sequential file read through node:fs. bench/checkpoint.ts reports
 * the whole; this says where its time goes.
 *   npx tsx bench/host-transfer.ts [--gb 1] [--dir /tmp] [--cpu]
 * Prints a table and writes bench/results/host-transfer-<date>.json.
 */
import { execFileSync } from "node:child_process"
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeFileSync } from "node:fs"
import { join, resolve } from "node:path"
import { crc32c } from "@node-rs/crc32"
import { loadNative } from "../src/native/index.ts"
import { cpuName, printTable, writeResult } from "./report.ts"

const arg = (name: string, fallback: string) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? process.argv[i + 1]! : fallback
}
const bytes = Math.round(Number(arg("gb", "1")) * 1e9)
const addon = loadNative()
const probe = addon.cudaProbe()
const cuda = probe.devices > 0 && !process.argv.includes("--cpu")
const be = cuda ? addon.createCuda(1) : addon.createCpu(1)
const device = cuda ? probe.gpus[0]!.name : cpuName()
const id = be.alloc(0, bytes)
const rows: Array<Record<string, string | number>> = []
const timed = (what: string, run: () => void, reps = 3) => {
  run()
  let best = Number.POSITIVE_INFINITY
  for (let i = 0; i < reps; i++) {
    const t = performance.now()
    run()
    best = Math.min(best, (performance.now() - t) / 1000)
  }
  rows.push({ what, GB: bytes / 1e9, s: best, "GB/s": bytes / 1e9 / best })
}
const host = new Uint8Array(bytes)
host.fill(7)
timed("device → host, touched memory", () => be.read(id, 0, bytes, host))
timed("host → device, touched memory", () => be.write(id, 0, host))
timed("device → host, fresh memory", () => be.read(id, 0, bytes, new Uint8Array(bytes)), 1)
timed("crc32c", () => crc32c(host))
timed("host memcpy", () => new Uint8Array(bytes).set(host), 1)
const dir = mkdtempSync(join(resolve(arg("dir", "/tmp")), "magix-transfer-"))
try {
  const file = join(dir, "x.bin")
  writeFileSync(file, host)
  execFileSync("sync")
  timed(
    "file read, one pread loop (cold where drop_caches works)",
    () => {
      try {
        writeFileSync("/proc/sys/vm/drop_caches", "3")
      } catch {}
      const fd = openSync(file, "r")
      for (let off = 0; off < bytes; ) off += readSync(fd, host, off, bytes - off, off)
      closeSync(fd)
    },
    1,
  )
} finally {
  rmSync(dir, { recursive: true, force: true })
}
be.free(id)
be.dispose()
console.log(`${device}: ${(bytes / 1e9).toFixed(2)} GB per transfer, best of 3 where repeated`)
printTable(rows)
console.log(`wrote ${writeResult("host-transfer", device, { bytes, cuda, rows })}`)
