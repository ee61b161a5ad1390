/** makeDirectories: mkdir -p that returns, also where Node 20's recursive mkdir spins forever. */
import { mkdtempSync, statSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { makeDirectories } from "../../src/layers/makeDirectories.ts"

describe("makeDirectories", () => {
  const base = mkdtempSync(join(tmpdir(), "magix-mkdir-"))

  it("makes missing parents and accepts what exists", async () => {
    const dir = join(base, "a", "b", "c")
    await makeDirectories(dir)
    expect(statSync(dir).isDirectory()).toBe(true)
    await makeDirectories(dir)
    await Promise.all([makeDirectories(join(base, "d", "e")), makeDirectories(join(base, "d", "e"))])
    expect(statSync(join(base, "d", "e")).isDirectory()).toBe(true)
  })

  it("fails (does not hang) under /proc and through a file", async () => {
    await expect(makeDirectories("/proc/magix-nope/x")).rejects.toMatchObject({ code: "ENOENT" })
    const file = join(base, "file")
    writeFileSync(file, "")
    await expect(makeDirectories(join(file, "x"))).rejects.toMatchObject({ code: "ENOTDIR" })
  }, 10_000)
})
