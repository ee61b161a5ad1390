import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // GPU tests run only through `npm run test:gpu` on a machine with a GPU.
    exclude: process.env.MAGIX_GPU_TESTS ? [] : ["test/gpu/**"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Native kernels already use every core; one test file at a time keeps timings sane on 2 cores.
    fileParallelism: false,
  },
})
