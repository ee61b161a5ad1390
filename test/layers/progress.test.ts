/**
 * The progress a person watches: every field on the line, MFU only where it was measured, a bar
 * redrawn in place (and throttled) on a terminal, plain lines without control characters elsewhere.
 */
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import {
  formatProgressBar,
  formatProgressLine,
  makeProgress,
  type ProgressFields,
  type ProgressSink,
} from "../../src/layers/Progress.ts"
import { formatCount, formatDuration } from "../../src/layers/report/format.ts"

const step = (n: number, extra: Partial<ProgressFields> = {}): ProgressFields => ({
  step: n,
  loss: 2.3456,
  learningRate: 1.5e-4,
  tokensPerSecond: 61_234,
  etaSeconds: 125,
  elapsedSeconds: 30,
  ...extra,
})

const sink = (isTTY: boolean, columns?: number) => {
  const out: string[] = []
  const s: ProgressSink = {
    isTTY,
    ...(columns !== undefined ? { columns } : {}),
    write: (t) => {
      out.push(t)
    },
  }
  return { s, out, text: () => out.join("") }
}

const run = (e: Effect.Effect<void>) => Effect.runSync(e)

describe("progress line", () => {
  it("has step, loss, learning rate, tokens/s, MFU and ETA", () => {
    const line = formatProgressLine(step(10, { mfu: 0.4123 }), 100)
    expect(line).toBe("magix: step 10/100  loss 2.346  lr 1.50e-4  61.2k tok/s  mfu 41.2%  eta 2m05s")
    const bar = formatProgressBar(step(10, { mfu: 0.4123 }), 100)
    expect(bar).toMatch(
      /^\[##-{18}\]\s+10%\s+step 10\/100 {2}loss 2\.346 {2}lr 1\.50e-4 {2}61\.2k tok\/s {2}mfu 41\.2% {2}eta 2m05s$/,
    )
  })

  it("leaves MFU out where no peak is known (the CPU), rather than inventing one", () => {
    expect(formatProgressLine(step(10), 100)).not.toContain("mfu")
  })

  it("the last step says how long the run took instead of an ETA", () => {
    const line = formatProgressLine(step(100), 100)
    expect(line).toContain("took 30s")
    expect(line).not.toContain("eta")
  })

  it("an unknown ETA and a warmup starting at zero read sensibly", () => {
    const line = formatProgressLine(step(1, { learningRate: 0, etaSeconds: Number.NaN }), 100)
    expect(line).toContain("lr 0 ")
    expect(line).toContain("eta ?")
    expect(formatDuration(7_620)).toBe("2h07m")
    expect(formatCount(950)).toBe("950")
    expect(formatCount(4.1e6)).toBe("4.10M")
  })
})

describe("progress output", () => {
  it("off a terminal: one plain line per logged step, no control characters", () => {
    const { s, out, text } = sink(false)
    const p = makeProgress({ sink: s })
    for (let i = 1; i <= 5; i++) run(p.update(step(i), 5))
    run(p.message("magix: warning: something"))
    run(p.end)
    expect(out).toHaveLength(6)
    expect(text()).not.toContain("\r")
    expect(text()).not.toContain("\x1b")
    expect(out[0]).toBe(`${formatProgressLine(step(1), 5)}\n`)
    expect(out[5]).toBe("magix: warning: something\n")
  })

  it("on a terminal: one line redrawn in place, at most every minRedrawMs, the last step always", () => {
    const { s, out, text } = sink(true)
    let t = 0
    const p = makeProgress({ sink: s, minRedrawMs: 100, now: () => t })
    run(p.update(step(1), 4)) // drawn
    t = 50
    run(p.update(step(2), 4)) // held back
    t = 80
    run(p.update(step(3), 4)) // held back, replaces step 2
    expect(out).toHaveLength(1)
    t = 90
    run(p.update(step(4), 4)) // the last: drawn at once
    run(p.end)
    expect(out).toHaveLength(3)
    expect(out[0]).toBe(`\r\x1b[2K${formatProgressBar(step(1), 4)}`)
    expect(out[1]).toBe(`\r\x1b[2K${formatProgressBar(step(4), 4)}`)
    expect(out[2]).toBe("\n")
    expect(text()).not.toContain("step 2/4")
  })

  it("end draws a step the throttle held back, so the last state shown is the real one", () => {
    const { s, out } = sink(true)
    let t = 0
    const p = makeProgress({ sink: s, minRedrawMs: 100, now: () => t })
    run(p.update(step(1), 10))
    t = 10
    run(p.update(step(2), 10))
    run(p.end)
    expect(out.at(-2)).toContain("step 2/10")
    expect(out.at(-1)).toBe("\n")
  })

  it("a message goes above the bar, which is drawn again below it", () => {
    const { s, out } = sink(true)
    const p = makeProgress({ sink: s, minRedrawMs: 0, now: () => 0 })
    run(p.update(step(1), 10))
    run(p.message("magix: warning: disk full"))
    expect(out[1]).toBe(`\r\x1b[2Kmagix: warning: disk full\n${formatProgressBar(step(1), 10)}`)
  })

  it("never wider than the terminal, so a redraw never wraps", () => {
    const { s, out } = sink(true, 40)
    const p = makeProgress({ sink: s, now: () => 0 })
    run(p.update(step(1, { mfu: 0.5 }), 10))
    expect(out[0]!.replace("\r\x1b[2K", "").length).toBeLessThan(40)
  })
})
