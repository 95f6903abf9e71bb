#!/usr/bin/env bash
# The official OpenAI client (npm `openai`, installed by setup_openai.sh into NPM_ROOT) against `mamba3 serve` on a
# free loopback port with a golden model: models, completion, chat, streamed completion and chat, errors, API key.
# Usage: test_openai_client.sh MAMBA3_CLI NPM_ROOT
set -euo pipefail
cli="$1"
root="$2"
here="$(cd "$(dirname "$0")" && pwd)"
golden="${MAMBA3_GOLDEN_DIR:-${MAMBA3_GOLDEN_DIR_DEFAULT:-$here/../../../shared/golden}}"
model="$golden/lm_siso_mlp"
[ -d "$model" ] || { echo "FAIL: golden model $model not found (set MAMBA3_GOLDEN_DIR)" >&2; exit 1; }
[ -d "$root/node_modules/openai" ] || { echo "FAIL: $root/node_modules/openai missing (server_openai_setup)" >&2; exit 1; }
log="$(mktemp)"
"$cli" serve -m "$model" --port 0 --alias golden --api-key test-key >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
port=""
for _ in $(seq 1 200); do
  port="$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log")"
  [ -n "$port" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "FAIL: the server exited:" >&2; cat "$log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "FAIL: the server did not report its port" >&2; cat "$log" >&2; exit 1; }
# ESM resolves packages from the script's folder: run a copy placed beside node_modules.
cp "$here/openai_client/check_client.mjs" "$root/check_client.mjs"
node "$root/check_client.mjs" "$port"
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "FAIL: /health after the client run" >&2; exit 1; }
echo "openai client test passed"
