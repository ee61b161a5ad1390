#!/usr/bin/env bash
# Packs what the GPU host needs into the ignored .carry/ (under the 64 MiB a device call carries):
# Node.js and npm via ../shared/gpu-host/pack.sh, then a slimmer node_modules without the lint,
# format and type-check tools, which nothing run there needs. (@redis stays: the `magix` command
# imports @effect/platform-node, whose index loads its Redis module, and failed there without it.)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info && touch .git/info/exclude
bash ../shared/gpu-host/pack.sh >/dev/null
tar -cf - --exclude='node_modules/.cache' --exclude='node_modules/.vite' --exclude='*.map' --exclude='*.d.ts' \
  --exclude='*.d.mts' --exclude='*.d.cts' --exclude='*.md' --exclude='node_modules/@biomejs' \
  --exclude='node_modules/@typescript' --exclude='node_modules/typescript' \
  --exclude='node_modules/lightningcss*' --exclude='node_modules/@types' --exclude='node_modules/effect/src' \
  --exclude='node_modules/effect/dist/dts' node_modules | xz -T0 -6 > .carry/node_modules.txz
du -ch .carry/* | tail -n 1
