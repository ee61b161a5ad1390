import { execFileSync } from "node:child_process"
import { mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "vitest"

// The loader caches the addon per process, so each failure mode runs in a child process.
const load = (env: Record<string, string>) => {
  const script = `
    import { loadNative } from "./src/native/index.ts"
    try { const a = loadNative(); console.log(JSON.stringify({ ok: true, threads: a.cpuThreads() })) }
    catch (e) { console.log(JSON.stringify({ ok: false, tag: e._tag, message: e.message })) }`
  const out = execFileSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
    env: { ...process.env, ...env },
    encoding: "utf8",
  })
  return JSON.parse(out.trim().split("\n").pop()!) as {
    ok: boolean
    tag?: string
    message?: string
    threads?: number
  }
}

describe("native loader", () => {
  it("loads the built addon", () => {
    const r = load({})
    expect(r.ok).toBe(true)
    expect(r.threads).toBeGreaterThan(0)
  })

  it("a missing addon is NativeAddonMissing, saying how to rebuild", () => {
    const r = load({ MAGIX_NATIVE_PATH: "/nonexistent/magix.node" })
    expect(r.tag).toBe("NativeAddonMissing")
    expect(r.message).toContain("npm run build:native")
  })

  it("an addon built for another platform or ABI is NativeAddonIncompatible", () => {
    const dir = mkdtempSync(join(tmpdir(), "magix-loader-"))
    const bogus = join(dir, "magix.node")
    writeFileSync(bogus, Buffer.from("\x7fELF not really a shared object"))
    const r = load({ MAGIX_NATIVE_PATH: bogus })
    expect(r.tag).toBe("NativeAddonIncompatible")
    expect(r.message).toContain("rebuild it")
  })
})
