#!/usr/bin/env node
// The `magix` command: TypeScript sources run through tsx's loader, so there is no build step.
import { register } from "tsx/esm/api"

// Checkpoint restores read many chunk files at once; libuv's default of 4 threads left the disk
// idle (H200 host: 16 arrays at once on 16 threads restored at 83% of dd, 4 on 4 at 69%). The pool
// starts on first use, so this must run before any file is read.
process.env.UV_THREADPOOL_SIZE ??= "16"

register()
await import("../programs/main.ts")
