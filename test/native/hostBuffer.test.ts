/** hostBuffer: native host memory for large transfers (pinned on GPUs, huge-page-advised here). */
import { describe, expect, it } from "vitest"
import { hostBuffer } from "../../src/native/hostMemory.ts"
import { loadNative } from "../../src/native/index.ts"

describe("hostBuffer", () => {
  const addon = loadNative()

  it("gives writable memory of the size asked, pinned or not, that round-trips through a device", () => {
    const be = addon.createCpu(1)
    try {
      for (const pinned of [false, true]) {
        const n = (5 << 20) + 3
        const a = new Uint8Array(addon.hostBuffer(n, pinned))
        expect(a.byteLength).toBe(n)
        for (let i = 0; i < n; i += 4099) a[i] = i & 255
        const id = be.alloc(0, n)
        be.write(id, 0, a)
        const back = new Uint8Array(addon.hostBuffer(n, pinned))
        be.read(id, 0, n, back)
        expect(Buffer.compare(back, a)).toBe(0)
        be.free(id)
      }
      expect(addon.hostBuffer(0, false).byteLength).toBe(0)
    } finally {
      be.dispose()
    }
  })

  it("small requests stay ordinary typed arrays; large ones are native", () => {
    expect(hostBuffer(1000, false).byteLength).toBe(1000)
    expect(hostBuffer(8 << 20, false).byteLength).toBe(8 << 20)
  })

  it("a negative or fractional size is refused", () => {
    expect(() => addon.hostBuffer(-1, false)).toThrow()
    expect(() => addon.hostBuffer(1.5, false)).toThrow()
  })
})
