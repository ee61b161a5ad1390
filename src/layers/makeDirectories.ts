/**
 * `mkdir -p` that always returns: creates `dir` and its missing parents one at a time. Not
 * `mkdir(dir, { recursive: true })`: on Node 20 that spins forever where the file system refuses
 * a directory with ENOENT (anywhere under /proc), so `--checkpoint-dir /proc/x` hung the command.
 */
import { mkdir, stat } from "node:fs/promises"
import { dirname } from "node:path"

export const makeDirectories = async (dir: string): Promise<void> => {
  const missing: string[] = []
  for (let d = dir; ; d = dirname(d)) {
    const exists = await stat(d).then(
      () => true,
      () => false,
    )
    if (exists) break
    missing.push(d)
    if (dirname(d) === d) break
  }
  for (const d of missing.reverse())
    await mkdir(d).catch((e: NodeJS.ErrnoException) => {
      // Another writer made it in between: what is wanted exists.
      if (e.code !== "EEXIST") throw e
    })
}
