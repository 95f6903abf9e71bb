#!/usr/bin/env bash
# Test fixture: installs the official npm `openai` client (openai_client/package.json + package-lock.json) into
# DEST/node_modules with `npm ci`. Fails (non-zero) when node/npm are missing or the registry is unreachable.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)/openai_client"
dest="$1"
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "setup_openai: $tool is not installed (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
mkdir -p "$dest"
if [ ! -d "$dest/node_modules/openai" ] || ! cmp -s "$here/package-lock.json" "$dest/package-lock.json"; then
  cp "$here/package.json" "$here/package-lock.json" "$dest/"
  (cd "$dest" && npm ci --no-audit --no-fund --loglevel=error)
else
  echo "setup_openai: $dest is up to date"
fi
