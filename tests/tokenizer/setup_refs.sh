#!/usr/bin/env bash
# Test fixture: installs the npm reference tokenizers (package.json + package-lock.json beside this script) into
# DEST/node_modules and exports vocabularies, test strings and reference ids into DEST/refs.
# Usage: setup_refs.sh DEST. Fails (non-zero) when node/npm are missing or the registry is unreachable.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$1"
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "setup_refs: $tool is not installed (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
mkdir -p "$dest"
if [ ! -d "$dest/node_modules" ] || ! cmp -s "$here/package-lock.json" "$dest/package-lock.json"; then
  cp "$here/package.json" "$here/package-lock.json" "$dest/"
  rm -rf "$dest/refs"
  (cd "$dest" && npm ci --no-audit --no-fund --loglevel=error)
fi
stamp="$(cat "$here/package-lock.json" "$here/export_refs.mjs" "$here/test_strings.mjs" | sha256sum | cut -c1-16)"
if [ "$(cat "$dest/refs/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$dest/refs"
  node "$here/export_refs.mjs" "$dest"
  echo "$stamp" > "$dest/refs/.stamp"
else
  echo "setup_refs: $dest/refs is up to date"
fi
