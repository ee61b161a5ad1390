/**
 * Command-line spellings of the original Magix scripts: `--model_type` is accepted for
 * `--model-type`, and list flags take several values (`--mesh-shape 2 -1`), which effect/cli
 * reads as one comma-separated value.
 */
const listFlags = new Set(["--mesh-shape"])

export const normalizeArgv = (argv: ReadonlyArray<string>): string[] => {
  const out: string[] = []
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i]!
    if (a.startsWith("--") && a.includes("_")) {
      const eq = a.indexOf("=")
      const name = eq < 0 ? a : a.slice(0, eq)
      a = name.replaceAll("_", "-") + (eq < 0 ? "" : a.slice(eq))
    }
    if (listFlags.has(a)) {
      const values: string[] = []
      // `2 -1`, `2,-1` and `2, -1` all name the same mesh
      while (i + 1 < argv.length && /^-?\d+(,-?\d+)*,?$/.test(argv[i + 1]!))
        values.push(argv[++i]!.replace(/,$/, ""))
      out.push(a, values.join(","))
      continue
    }
    out.push(a)
  }
  return out
}

/** "2,-1" → [2, -1]. */
export const parseIntList = (s: string): number[] =>
  s
    .split(/[,\s]+/)
    .filter((x) => x.length > 0)
    .map((x) => Number.parseInt(x, 10))
