/**
 * The run report: a self-contained page (nothing fetched from anywhere), one curve vertex per
 * logged step, the values and the summary on the page, metrics files read back with a typed error
 * naming the bad line, the live page refreshed at checkpoints and marked with the run's outcome,
 * and, where Chromium is installed, the page rendered by a real browser.
 */
import { execFileSync } from "node:child_process"
import { existsSync, mkdtempSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { delimiter, join } from "node:path"
import { Cause, Effect, Exit, Fiber } from "effect"
import { describe, expect, it } from "vitest"
import { peakFlopsOf, totalPeakFlops } from "../../src/core/peakFlops.ts"
import { decimate, lineChart, niceTicks } from "../../src/layers/report/chart.ts"
import { readMetricsFile, writeReport } from "../../src/layers/report/files.ts"
import { formatDuration, formatLearningRate, formatValue } from "../../src/layers/report/format.ts"
import { type ReportRow, renderReport, sampleRows, summarize } from "../../src/layers/report/html.ts"
import { describeFlags, makeLiveReport } from "../../src/layers/report/liveReport.ts"
import type { StepMetrics } from "../../src/layers/Training.ts"

const tmp = (prefix: string) => mkdtempSync(join(tmpdir(), `magix-report-${prefix}-`))

/** A warmup-then-decay run of `n` logged steps, as `trainLoop` would log them. */
const metrics = (n: number, from = 1): StepMetrics[] =>
  Array.from({ length: n }, (_, i) => {
    const step = from + i
    return {
      step,
      loss: 5 * Math.exp(-step / 40) + 1 + 0.05 * Math.sin(step),
      learningRate: step <= 10 ? 3e-4 * (step / 10) : 3e-4 * (1 - (step - 10) / (n + 10)),
      gradNorm: 1 + 1 / step,
      tokens: step * 512,
      tokensPerSecond: 4000 + (step % 7) * 10,
      skippedSteps: 0,
      elapsedSeconds: step * 0.128,
      etaSeconds: (n - step) * 0.128,
      epoch: 0,
      deviceMemory: { inUse: [1 << 20, 1 << 20], peak: [36 << 20, 35 << 20] },
    }
  })

const rowsOf = (ms: ReadonlyArray<StepMetrics>): ReportRow[] =>
  ms.map((m) => ({
    step: m.step,
    loss: m.loss,
    learningRate: m.learningRate,
    gradNorm: m.gradNorm,
    tokensPerSecond: m.tokensPerSecond,
    tokens: m.tokens,
    elapsedSeconds: m.elapsedSeconds,
    etaSeconds: m.etaSeconds,
    skippedSteps: m.skippedSteps,
    peakMemory: Math.max(...m.deviceMemory.peak),
  }))

const page = (rows: ReadonlyArray<ReportRow>, title = "magix train: test run") =>
  renderReport({
    title,
    status: "finished",
    updatedAt: new Date("2026-01-02T03:04:05Z"),
    totalSteps: rows.at(-1)?.step ?? 0,
    rows,
    sections: [{ title: "Flags", entries: [["--learning-rate", "3e-4"]] }],
  })

/** The `d` of the path drawing `series`, and the vertices it has. */
const pathOf = (html: string, series: string) => {
  const m = html.match(new RegExp(`<path class="series ${series}"[^>]*data-points="(\\d+)" d="([^"]*)"`))
  if (!m) throw new Error(`no ${series} path`)
  return { declared: Number(m[1]), vertices: (m[2]!.match(/[ML]/g) ?? []).length, d: m[2]! }
}

/** Anything that would make the browser fetch: a URL in src/href, a script, a stylesheet link. */
const externalReferences = (html: string) => [
  ...(html.match(/\b(?:src|href)\s*=\s*["']?(?:https?:)?\/\//gi) ?? []),
  ...(html.match(/<script\b/gi) ?? []),
  ...(html.match(/<link\b/gi) ?? []),
  ...(html.match(/@import|url\(/gi) ?? []),
]

const failureOf = <E>(exit: Exit.Exit<unknown, E>): E => {
  if (Exit.isSuccess(exit)) throw new Error("expected a failure")
  const e = Cause.findErrorOption(exit.cause)
  if (e._tag === "None") throw new Error(`expected a typed failure, got ${Cause.pretty(exit.cause)}`)
  return e.value
}

describe("report page", () => {
  const rows = rowsOf(metrics(60))
  const html = page(rows)

  it("is self-contained: inline style and SVG, nothing fetched", () => {
    expect(html.startsWith("<!doctype html>")).toBe(true)
    expect(html).toContain("<style>")
    expect(html).toContain("<svg")
    expect(externalReferences(html)).toEqual([])
  })

  it("draws one vertex per logged step for the loss and the learning rate", () => {
    for (const series of ["s-loss", "s-lr"]) {
      const p = pathOf(html, series)
      expect(p.declared).toBe(60)
      expect(p.vertices).toBe(60)
    }
    // Loss falls, so the last vertex sits lower on the page (a larger y) than the first.
    const ys = pathOf(html, "s-loss")
      .d.split(/[ML]/)
      .filter(Boolean)
      .map((xy) => Number(xy.split(" ")[1]))
    expect(ys.at(-1)!).toBeGreaterThan(ys[0]!)
  })

  it("shows the learning rates, the summary and the configuration", () => {
    for (const r of rows) expect(html).toContain(`<td>${formatLearningRate(r.learningRate!)}</td>`)
    const s = summarize(rows)
    expect(s.lastStep).toBe(60)
    expect(s.lowestLoss![1]).toBe(Math.min(...rows.map((r) => r.loss)))
    expect(html).toContain("60 / 60")
    expect(html).toContain("final loss")
    expect(html).toContain(
      `lowest (step ${s.lowestLoss![0]})</div><div class="v">${formatValue(s.lowestLoss![1])}</div>`,
    )
    expect(html).toContain("training time")
    expect(html).toContain(formatDuration(60 * 0.128))
    expect(html).toContain("--learning-rate")
    expect(html).toContain("Peak device memory (MiB)")
    // No MFU was logged (a CPU run): no MFU chart, card or column, rather than a made-up one.
    expect(html).not.toMatch(/MFU|utilisation/)
  })

  it("escapes what it did not write", () => {
    const evil = page(rows.slice(0, 3), `<script>alert(1)</script>"&`)
    expect(evil).not.toContain("<script>")
    expect(evil).toContain("&#60;script&#62;alert(1)&#60;/script&#62;&#34;&#38;")
  })

  it("shows MFU where it was measured, and the mean over the run", () => {
    const withMfu = rows.map((r, i) => ({ ...r, mfu: i % 2 === 0 ? 0.4 : 0.5 }))
    const h = page(withMfu)
    expect(pathOf(h, "s-mfu").vertices).toBe(60)
    expect(summarize(withMfu).meanMfu).toBeCloseTo(0.45)
    expect(h).toContain("mean MFU")
    expect(h).toContain("45.0%")
  })

  it("keeps the later line of a step logged twice (a resumed run), and sums time over the processes", () => {
    const first = rowsOf(metrics(8)) // killed after step 8, last checkpoint at 6
    const second = rowsOf(metrics(4, 7)).map((r, i) => ({ ...r, loss: 9, elapsedSeconds: (i + 1) * 0.1 }))
    const all = [...first, ...second]
    const s = summarize(all)
    expect(s.lastStep).toBe(10)
    expect(s.finalLoss).toBe(9)
    expect(s.trainingSeconds).toBeCloseTo(8 * 0.128 + 0.4)
    expect(pathOf(page(all), "s-loss").vertices).toBe(10)
  })

  it("breaks the curve at a non-finite loss and counts it", () => {
    const withNan = rows.slice(0, 10).map((r) => (r.step === 5 ? { ...r, loss: Number.NaN } : r))
    const h = page(withNan)
    const p = pathOf(h, "s-loss")
    expect(p.vertices).toBe(9)
    expect((p.d.match(/M/g) ?? []).length).toBe(2)
    expect(summarize(withNan).nonFiniteLosses).toBe(1)
    expect(h).toContain("non-finite losses")
  })

  it("says there is no data yet on an empty run", () => {
    const h = page([])
    expect(h).toContain("no data yet")
    expect(externalReferences(h)).toEqual([])
  })
})

describe("charts", () => {
  it("ticks are round numbers covering the range", () => {
    expect(niceTicks(0, 10)).toEqual([0, 2, 4, 6, 8, 10])
    expect(niceTicks(1.2e-4, 3.1e-4)).toEqual([1.5e-4, 2e-4, 2.5e-4, 3e-4])
  })

  it("a long series keeps every bucket's extremes, so a spike survives", () => {
    const points = Array.from({ length: 10_000 }, (_, i) => [i, i === 4321 ? 100 : 1] as const)
    const kept = decimate(points, 500)
    expect(kept.length).toBeLessThanOrEqual(500)
    expect(kept.some(([s, v]) => s === 4321 && v === 100)).toBe(true)
    const svg = lineChart([{ name: "loss", points, className: "s-loss" }], { title: "Loss", maxPoints: 500 })
    expect(Number(svg.match(/data-points="(\d+)"/)![1])).toBe(kept.length)
  })

  it("a run of 300k logged steps renders (no spread of every value into Math.max)", () => {
    const rows = Array.from({ length: 300_000 }, (_, i) => ({
      step: i + 1,
      loss: 2 + Math.cos(i),
      learningRate: 1e-4,
      peakMemory: 2 ** 33 + i,
    }))
    const h = page(rows)
    expect(pathOf(h, "s-loss").vertices).toBeLessThanOrEqual(4000)
    expect(h).toContain("Peak device memory (GiB)")
    expect(summarize(rows).lastStep).toBe(300_000)
  })

  it("the steps axis ends at the last logged step", () => {
    const svg = lineChart(
      [
        {
          name: "loss",
          points: [
            [1, 3],
            [360, 1],
          ],
          className: "s-loss",
        },
      ],
      { title: "Loss", width: 640 },
    )
    // The last vertex sits on the right edge of the plot (width - right margin).
    expect(svg).toMatch(/L624 \d/)
  })

  it("a single point is drawn as a dot", () => {
    const svg = lineChart([{ name: "loss", points: [[1, 2]], className: "s-loss" }], { title: "Loss" })
    expect(svg).toContain("<circle")
  })

  it("the steps table samples evenly, first and last included", () => {
    const rows = rowsOf(metrics(1000))
    const s = sampleRows(rows, 200)
    expect(s).toHaveLength(200)
    expect(s[0]!.step).toBe(1)
    expect(s.at(-1)!.step).toBe(1000)
    expect(page(rows)).toContain("Logged steps (1000, 200 of them shown evenly spaced)")
  })
})

describe("peak FLOP/s", () => {
  it("knows the data-sheet GPUs and nothing else", () => {
    expect(peakFlopsOf("NVIDIA H100 80GB HBM3")).toBe(989e12)
    expect(peakFlopsOf("NVIDIA H100 PCIe")).toBe(756e12)
    expect(peakFlopsOf("NVIDIA H200")).toBe(989e12)
    expect(peakFlopsOf("NVIDIA A100-SXM4-80GB")).toBe(312e12)
    expect(peakFlopsOf("NVIDIA L40S")).toBe(362e12)
    expect(peakFlopsOf("cpu:0")).toBeUndefined()
    expect(totalPeakFlops(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])).toBe(2 * 989e12)
    expect(totalPeakFlops(["NVIDIA H100 80GB HBM3", "cpu:1"])).toBeUndefined()
    expect(totalPeakFlops([])).toBeUndefined()
  })
})

describe("metrics file", () => {
  const lines = (ms: ReadonlyArray<StepMetrics>) => ms.map((m) => `${JSON.stringify(m)}\n`).join("")

  it("reads back what training writes, a non-finite loss (null) included", async () => {
    const dir = tmp("read")
    const path = join(dir, "m.jsonl")
    const ms = metrics(5)
    writeFileSync(path, lines(ms).replace(/"loss":[^,]+/, '"loss":null'))
    const rows = await Effect.runPromise(readMetricsFile(path))
    expect(rows.map((r) => r.step)).toEqual([1, 2, 3, 4, 5])
    expect(rows[0]!.loss).toBeNaN()
    expect(rows[1]!.learningRate).toBe(ms[1]!.learningRate)
    expect(rows[1]!.peakMemory).toBe(36 << 20)
  })

  it("leaves out a last line cut short by a kill", async () => {
    const path = join(tmp("cut"), "m.jsonl")
    writeFileSync(path, `${lines(metrics(3))}{"step":4,"lo`)
    const rows = await Effect.runPromise(readMetricsFile(path))
    expect(rows.map((r) => r.step)).toEqual([1, 2, 3])
  })

  it("a malformed line is a typed error with the file and the line", async () => {
    const path = join(tmp("bad"), "m.jsonl")
    const good = lines(metrics(4)).split("\n")
    good.splice(2, 0, "{ not json")
    writeFileSync(path, good.join("\n"))
    const e = failureOf(await Effect.runPromiseExit(readMetricsFile(path)))
    expect(e._tag).toBe("MetricsLineInvalid")
    expect(e).toMatchObject({ path, line: 3 })
    expect(e.message).toContain(`${path}, line 3`)
    expect(e.message).not.toContain("\n")
  })

  it("a line with a mistyped field names the field", async () => {
    const path = join(tmp("field"), "m.jsonl")
    writeFileSync(path, `${lines(metrics(1))}{"step":"two","loss":1}\n`)
    const e = failureOf(await Effect.runPromiseExit(readMetricsFile(path)))
    expect(e).toMatchObject({ _tag: "MetricsLineInvalid", line: 2 })
    expect(e.message).toContain('"step"')
  })

  it("a missing file is a typed error with the path", async () => {
    const e = failureOf(await Effect.runPromiseExit(readMetricsFile("/nonexistent/m.jsonl")))
    expect(e).toMatchObject({ _tag: "MetricsFileNotFound", path: "/nonexistent/m.jsonl" })
  })
})

describe("live report", () => {
  const flags = describeFlags({ maxSteps: 12, report: "r.html", fn: () => 0 })

  it("lists the flags as given, never functions", () => {
    expect(flags).toEqual([
      ["--max-steps", "12"],
      ["--report", "r.html"],
    ])
  })

  it("writes the page at once, refreshes it when a checkpoint interval is crossed, and marks the outcome", async () => {
    const path = join(tmp("live"), "sub", "r.html")
    const steps = metrics(12)
    const seen: number[] = []
    await Effect.runPromise(
      Effect.gen(function* () {
        const report = yield* makeLiveReport({ path, title: "live", flags, everySteps: 5, now: () => 0 })
        expect(readFileSync(path, "utf8")).toContain("no data yet")
        for (const m of steps) {
          yield* report.step(m)
          const html = readFileSync(path, "utf8")
          seen.push(html.includes('class="series s-loss"') ? pathOf(html, "s-loss").vertices : 0)
        }
        yield* report.finish(Exit.fail("boom"))
      }),
    )
    // Refreshed at steps 5 and 10 only (the clock never moves).
    expect(seen).toEqual([0, 0, 0, 0, 5, 5, 5, 5, 5, 10, 10, 10])
    const last = readFileSync(path, "utf8")
    expect(pathOf(last, "s-loss").vertices).toBe(12)
    expect(last).toContain("status-failed")
    expect(last).toContain("boom")
  })

  it("an unwritable path fails the command before training starts", async () => {
    const file = join(tmp("ro"), "a-file")
    writeFileSync(file, "")
    const e = failureOf(
      await Effect.runPromiseExit(
        makeLiveReport({ path: join(file, "r.html"), title: "x", flags, everySteps: 5 }),
      ),
    )
    expect(e._tag).toBe("ReportWriteFailed")
    expect(e.message).toContain("--report")
  })

  it.skipIf(!existsSync("/proc/self"))(
    "a directory the file system refuses (under /proc) is an error, not a hang",
    async () => {
      const e = failureOf(await Effect.runPromiseExit(writeReport("/proc/magix-nope/sub/r.html", "x")))
      expect(e).toMatchObject({ _tag: "ReportWriteFailed", path: "/proc/magix-nope/sub/r.html" })
    },
    10_000,
  )

  it("a write interrupted (Ctrl-C) completes first, so a later page is never overwritten by it", async () => {
    const path = join(tmp("interrupt"), "deep", "er", "r.html")
    await Effect.runPromise(
      Effect.gen(function* () {
        const fiber = yield* Effect.forkChild(writeReport(path, page(rowsOf(metrics(2000)))))
        yield* Effect.yieldNow
        yield* Fiber.interrupt(fiber)
        expect(readFileSync(path, "utf8")).toContain("</html>")
      }),
    )
  })

  it("writes atomically: no temporary file is left beside the page", async () => {
    const dir = tmp("atomic")
    await Effect.runPromise(writeReport(join(dir, "r.html"), page([])))
    await Effect.runPromise(writeReport(join(dir, "a", "b", "r.html"), page([])))
    expect(readdirSync(dir).sort()).toEqual(["a", "r.html"])
    expect(readdirSync(join(dir, "a", "b"))).toEqual(["r.html"])
    expect(readFileSync(join(dir, "r.html"), "utf8")).toContain("</html>")
  })
})

/** A `chromium` on PATH, or undefined (then the browser test is skipped). */
const chromium = (process.env.PATH ?? "")
  .split(delimiter)
  .map((d) => join(d, "chromium"))
  .find((p) => existsSync(p))

describe("in a real browser", () => {
  it.skipIf(chromium === undefined)(
    "headless Chromium renders the page: a screenshot of the whole window and the SVG curves in the DOM",
    () => {
      const dir = tmp("chromium")
      const file = join(dir, "report.html")
      writeFileSync(file, page(rowsOf(metrics(120))))
      const shot = join(dir, "report.png")
      const common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        `--user-data-dir=${join(dir, "profile")}`,
        "--window-size=1200,900",
      ]
      const run = (extra: string[]) =>
        execFileSync(chromium!, [...common, ...extra, `file://${file}`], {
          encoding: "utf8",
          stdio: ["ignore", "pipe", "ignore"],
          timeout: 90_000,
          maxBuffer: 64 << 20,
        })
      run([`--screenshot=${shot}`])
      const png = readFileSync(shot)
      expect(png.subarray(1, 4).toString("latin1")).toBe("PNG")
      // IHDR: the image is the window, and a blank page would compress to a few kilobytes.
      expect([png.readUInt32BE(16), png.readUInt32BE(20)]).toEqual([1200, 900])
      expect(statSync(shot).size).toBeGreaterThan(20_000)
      const dom = run(["--dump-dom"])
      expect(dom).toMatch(/<svg class="chart"/)
      expect(pathOf(dom, "s-loss").vertices).toBe(120)
      expect(pathOf(dom, "s-lr").vertices).toBe(120)
      expect(dom).toContain("final loss")
    },
    120_000,
  )
})
