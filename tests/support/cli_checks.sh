# Shared by the CLI test scripts (source it): a temporary directory removed on exit, a failure counter, and the check
# that a command fails cleanly — `error: …` containing the wanted text on stderr, a non-zero exit, no crash (a signal
# gives an exit status above 128).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

expect_error() {  # name, substring of the error, command…
  local name="$1" want="$2"; shift 2
  "$@" >/dev/null 2>"$tmp/err"; local rc=$?
  if [ $rc -eq 0 ] || [ $rc -gt 128 ] || ! grep -q "^error: .*$want" "$tmp/err"; then
    fail "$name: rc=$rc, stderr: $(cat "$tmp/err") (wanted 'error: …$want')"
  else echo "ok: $name"; fi
}
