#!/usr/bin/env bash
# Builds the CUDA tests and the CLI on this machine (sm_90, portable x86-64-v3 host code) and packs them, with the
# shared libraries the GPU machine's image lacks, into gpu-bundle/bundle.tar.xz (git-ignored). The device tool
# carries gpu-bundle/ and golden/ to the GPU machine (all binaries: 15.5 MB, within the carry limit), where
# scripts/gpu_run.sh unpacks and runs them: that machine has no package manager and no network, and building there
# would spend GPU time on compiling.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-bundle}
# Device code for sm_90 only (no PTX), no source-line tables unless BUNDLE_LINEINFO=ON (ncu source views), fatbinaries
# compressed for size: the whole bundle then fits one device call with the golden data (the line tables and the PTX
# were about 85 % of every binary's device code).
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMAMBA3_CUDA=ON -DMAMBA3_NATIVE=OFF \
  -DCMAKE_CXX_FLAGS="-march=x86-64-v3" -DMAMBA3_TEST_AREAS=cuda -DMAMBA3_CUDA_ARCH=90-real \
  -DMAMBA3_CUDA_LINEINFO="${BUNDLE_LINEINFO:-OFF}" -DCMAKE_CUDA_FLAGS="--compress-mode=size" >/dev/null
targets=(mamba3_cli bench_server bench_fused_gemm)
# BUNDLE_BINS="mamba3 test_x …": build and pack only these test binaries (the device tool carries at most 64 MiB
# with the tree, and a fresh machine's two cores take long over all of them). BUNDLE_OUT: the archive (default
# gpu-bundle/bundle.tar.xz), so that runs needing different binaries can carry different archives.
for t in $(grep -ho 'mamba3_cuda_test([a-z0-9_]*' tests/cuda/*.tests.cmake | sed 's/mamba3_cuda_test(//'); do
  if [[ -z ${BUNDLE_BINS:-} || " $BUNDLE_BINS " == *" $t "* ]]; then targets+=("$t"); fi
done
nice cmake --build "$BUILD" -j "$(nproc)" --target "${targets[@]}"
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/lib"
cp "$BUILD/tools/mamba3/mamba3" "$BUILD/bench/bench_server" "$BUILD/bench/bench_fused_gemm" "$stage/bin/"
for t in "${targets[@]:3}"; do cp "$BUILD/tests/$t" "$stage/bin/"; done
if [[ -n ${BUNDLE_BINS:-} ]]; then
  for f in "$stage"/bin/*; do [[ " $BUNDLE_BINS " == *" $(basename "$f") "* ]] || rm "$f"; done
fi
strip "$stage"/bin/*
# The ctest entries that rerun a bundled binary with other arguments or environment (add_test … ENVIRONMENT in
# tests/cuda/*.tests.cmake), as lines "name|binary|arguments|VAR=value …" for scripts/gpu_run.sh: read from ctest, so
# that a new variant is written in one place.
ctest --test-dir "$BUILD" -L cuda --show-only=json-v1 | python3 -c '
import json, os, sys
bundled = set(sys.argv[1:])
for test in json.load(sys.stdin)["tests"]:
    command = test.get("command") or []
    props = {p["name"]: p["value"] for p in test.get("properties", [])}
    env = props.get("ENVIRONMENT") or []
    if command and os.path.basename(command[0]) in bundled and (len(command) > 1 or env):
        print("|".join([test["name"], os.path.basename(command[0]), " ".join(command[1:]), " ".join(env)]))
' $(ls "$stage/bin") > "$stage/variants.txt"
cat "$stage/variants.txt"
# Non-system libraries the binaries need, except the CUDA ones (the GPU machine has its own toolkit).
for lib in $(ldd "$stage"/bin/* | awk '/=>/ {print $3}' | sort -u); do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libstdc++.so*|libgcc_s.so*|libcuda*|libcublas*) ;;
    *) cp -L "$lib" "$stage/lib/" ;;
  esac
done
out=${BUNDLE_OUT:-gpu-bundle/bundle.tar.xz}
mkdir -p "$(dirname "$out")"
# xz -9e: less than half the bytes of xz's default level on these binaries (42 → 20 MB for the CLI and six test
# binaries), which the carry limit counts.
XZ_OPT="${XZ_OPT:--9e -T0}" tar -C "$stage" -cJf "$out" bin lib variants.txt
rm -rf "$stage"
ls -la "$out"
