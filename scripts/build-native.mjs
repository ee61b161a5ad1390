// Builds the native addon with cmake-js (run by `npm install`). The CUDA backend is built
// whenever nvcc is found; MAGIX_CUDA=0 or =1 forces the choice. Skips the build when the addon
// is newer than every native source, unless --force. --sanitize (or MAGIX_SANITIZE=1) builds an
// AddressSanitizer + UBSan addon for fuzzing into build-asan/ instead, its own CMake cache, so the
// default build never inherits the flag; load it with MAGIX_NATIVE_PATH (see README, Hardening).
import { execFileSync, spawnSync } from "node:child_process"
import { existsSync, readdirSync, statSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const root = join(dirname(fileURLToPath(import.meta.url)), "..")
const output = join(root, "build", "Release", "magix.node")
const force = process.argv.includes("--force")
const sanitize = process.argv.includes("--sanitize") || process.env.MAGIX_SANITIZE === "1"

function findNvcc() {
  if (process.env.MAGIX_CUDA === "0") return null
  const candidates = [process.env.CUDACXX, "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"].filter(Boolean)
  for (const c of candidates) if (existsSync(c)) return c
  try {
    return execFileSync("sh", ["-c", "command -v nvcc"], { encoding: "utf8" }).trim() || null
  } catch {
    return null
  }
}

function newestSource(dir) {
  let newest = 0
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, entry.name)
    if (entry.isDirectory()) newest = Math.max(newest, newestSource(p))
    else if (/\.(cc|cu|h|cuh)$|ABI_VERSION$/.test(entry.name)) newest = Math.max(newest, statSync(p).mtimeMs)
  }
  return newest
}

const nvcc = findNvcc()
if (process.env.MAGIX_CUDA === "1" && !nvcc) {
  console.error("magix: MAGIX_CUDA=1 but nvcc was not found (set CUDACXX to its path)")
  process.exit(1)
}
const sources = Math.max(
  newestSource(join(root, "src", "native")),
  statSync(join(root, "CMakeLists.txt")).mtimeMs,
)
if (!force && !sanitize && existsSync(output) && statSync(output).mtimeMs > sources) {
  console.log("magix: native addon is up to date")
  process.exit(0)
}

const cmakeJs = join(root, "node_modules", "cmake-js", "bin", "cmake-js")
const args = [cmakeJs, "compile", "--directory", root, "--out", sanitize ? "build-asan" : "build"]
const jobs =
  process.env.MAGIX_BUILD_JOBS ?? String(Math.max(1, (await import("node:os")).availableParallelism()))
args.push("--parallel", jobs)
if (nvcc) args.push("--CDMAGIX_CUDA=ON", `--CDCMAKE_CUDA_COMPILER=${nvcc}`)
else args.push("--CDMAGIX_CUDA=OFF")
if (sanitize) args.push("--CDMAGIX_SANITIZE=ON", "--debug")
console.log(
  `magix: building the native addon (${nvcc ? `CPU + CUDA with ${nvcc}` : "CPU only: nvcc not found"})`,
)
const result = spawnSync(process.execPath, args, { stdio: "inherit", cwd: root })
if (result.status !== 0) {
  console.error(
    "magix: the native build failed; see the compiler output above. It needs cmake and a C++17 compiler.",
  )
  process.exit(result.status ?? 1)
}
if (sanitize)
  console.log(
    `magix: sanitizer build at ${join(root, "build-asan", "Debug", "magix.node")}; run with ` +
      "MAGIX_NATIVE_PATH=<that path> LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0",
  )
