/**
 * Which files of a dataset repository hold a split, the way `datasets` lays them out on the Hub
 * (push_to_hub, the parquet conversion, hand-made repositories), and the check that every file
 * named by a repository stays inside it.
 */
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { DatasetUnsafePath } from "../../core/data/errors.ts"

export type DataFileKind = "jsonl" | "parquet" | "txt"

/** The kind of a data file by its extension; `.json` is read as JSON Lines, as the Hub's are. */
export const kindOf = (file: string): DataFileKind | undefined => {
  const lower = file.toLowerCase()
  if (lower.endsWith(".parquet")) return "parquet"
  if (lower.endsWith(".jsonl") || lower.endsWith(".json") || lower.endsWith(".ndjson")) return "jsonl"
  if (lower.endsWith(".txt")) return "txt"
  return undefined
}

/** The words `datasets` takes for each standard split in file and directory names. */
const SPLIT_KEYWORDS: Readonly<Record<string, ReadonlyArray<string>>> = {
  train: ["train", "training"],
  validation: ["validation", "valid", "dev", "val"],
  test: ["test", "testing", "eval", "evaluation"],
}

/** `datasets`' NON_WORDS_CHARS: what may stand around a split keyword in a name. */
const SEP = "[-._ 0-9]"

const escapeRegExp = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")

const keywordsOf = (split: string) => SPLIT_KEYWORDS[split] ?? [split]

/** A keyword as a directory name (`train/`, `train-v2/`, `x/train/`), as datasets' dir patterns. */
const inDirName = (keyword: string) => new RegExp(`(^|${SEP}|/)${escapeRegExp(keyword)}(${SEP}[^/]*)?/.+$`)
/** A keyword in the file name (`train.jsonl`, `data/train-0000.parquet`), as datasets' file patterns. */
const inFileName = (keyword: string) => new RegExp(`(^|${SEP}|/)${escapeRegExp(keyword)}${SEP}[^/]*$`)

/** The preferred kind among matches: one split is read with one reader, Parquet first. */
const oneKind = (files: ReadonlyArray<string>): ReadonlyArray<string> => {
  for (const kind of ["parquet", "jsonl", "txt"] as const) {
    const of = files.filter((f) => kindOf(f) === kind)
    if (of.length > 0) return [...of].sort()
  }
  return []
}

const matchIn = (
  files: ReadonlyArray<string>,
  split: string,
  exact: ReadonlyArray<RegExp>,
): ReadonlyArray<string> => {
  const tries: ReadonlyArray<ReadonlyArray<RegExp>> = [
    exact,
    keywordsOf(split).map(inDirName),
    keywordsOf(split).map(inFileName),
  ]
  for (const patterns of tries) {
    const found = oneKind(files.filter((f) => patterns.some((p) => p.test(f))))
    if (found.length > 0) return found
  }
  // As datasets: a repository whose names mention no split at all is one "train" split.
  if (split === "train") {
    const anySplit = Object.keys(SPLIT_KEYWORDS).some((s) =>
      files.some((f) => keywordsOf(s).some((k) => inDirName(k).test(f) || inFileName(k).test(f))),
    )
    if (!anySplit) return oneKind(files)
  }
  return []
}

/**
 * The data files of `split` (and `config`) among a repository's files, sorted. Tried in order:
 * `<config>/<split>-*` and `<config>/<split>/**` (push_to_hub with a config, the parquet
 * conversion), `data/<split>-*`, `data/<split>/**`, `<split>/**`, `<split>-*`, then a split keyword
 * in a directory name, then in a file name; with no split anywhere, every file is "train".
 * A config other than "default" only looks inside its own directory.
 */
export const selectSplitFiles = (
  files: ReadonlyArray<string>,
  split: string,
  config?: string,
): ReadonlyArray<string> => {
  const data = files.filter((f) => kindOf(f) !== undefined)
  const s = escapeRegExp(split)
  const exact = (prefix: string) => [new RegExp(`^${prefix}${s}-[^/]*$`), new RegExp(`^${prefix}${s}/.+$`)]
  if (config !== undefined && config !== "default") {
    const prefix = `${config}/`
    const inside = data.filter((f) => f.startsWith(prefix)).map((f) => f.slice(prefix.length))
    return matchIn(inside, split, [...exact(""), ...exact("data/")]).map((f) => prefix + f)
  }
  const direct = oneKind(
    data.filter((f) => [...exact("default/"), ...exact("data/"), ...exact("")].some((p) => p.test(f))),
  )
  if (direct.length > 0) return direct
  return matchIn(data, split, [])
}

/** The data files of a listing, for an error that says what the repository does have. */
export const dataFilesOf = (files: ReadonlyArray<string>): ReadonlyArray<string> =>
  files.filter((f) => kindOf(f) !== undefined)

/**
 * Checks a repository path before use (relative, `/`-separated, no `..`), then that `resolved`,
 * the local path it came to, really lies inside the repository: its real path (symlinks
 * followed) is under the repository's directory, or, for a Hugging Face cache snapshot whose
 * files are links into `../../blobs`, under that cache entry's blobs.
 */
export const checkDataPath = async (repo: string, rel: string, resolved: string): Promise<string> => {
  const refuse = (reason: string) => new DatasetUnsafePath({ repo, path: rel, reason })
  if (rel === "" || rel.includes("\0") || rel.includes("\\"))
    throw refuse("empty, or holds a NUL or a backslash")
  if (rel.startsWith("/") || /^[a-zA-Z]:/.test(rel)) throw refuse("absolute paths are not repository paths")
  const parts = rel.split("/")
  if (parts.some((p) => p === ".." || p === "." || p === "")) throw refuse("it would leave the repository")
  const absolute = path.resolve(resolved)
  const suffix = path.join(...parts)
  if (!absolute.endsWith(path.sep + suffix)) throw refuse(`it resolved to ${absolute}, elsewhere`)
  const root = absolute.slice(0, absolute.length - suffix.length - 1)
  const real = await fs.realpath(absolute).catch(() => {
    throw refuse(`${absolute} cannot be read`)
  })
  const within = (dir: string) => real === dir || real.startsWith(dir + path.sep)
  const realRoot = await fs.realpath(root).catch(() => root)
  if (within(realRoot)) return absolute
  if (path.basename(path.dirname(root)) === "snapshots") {
    const blobs = await fs.realpath(path.join(root, "..", "..", "blobs")).catch(() => undefined)
    if (blobs !== undefined && within(blobs)) return absolute
  }
  throw refuse(`it is a link to ${real}, outside the dataset`)
}
