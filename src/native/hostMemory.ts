/**
 * Host buffers for large device transfers (checkpoint snapshots and restores). Below a few MiB a
 * plain Uint8Array; above, native memory: pinned on a GPU, so copies DMA straight into it, and
 * huge-page-advised elsewhere, because first touches of fresh pages (~1.6 GB/s on the hosts
 * measured by bench/host-transfer.ts) cost more than the copies. Like Buffer.allocUnsafe, a
 * native buffer's contents are unspecified: callers overwrite what they read.
 */
import { loadNative } from "./index.ts"

const NATIVE_FROM = 4 << 20

export const hostBuffer = (bytes: number, pinned: boolean): Uint8Array =>
  bytes >= NATIVE_FROM ? new Uint8Array(loadNative().hostBuffer(bytes, pinned)) : new Uint8Array(bytes)
