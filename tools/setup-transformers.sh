#!/usr/bin/env bash
# Install Hugging Face `transformers serve` (CPU torch) into its own virtualenv
# in the cache, outside the checkout, for dynllm's transformers backend.
#
# Prints the absolute path of the venv's `transformers` executable on its last
# line. A finished venv is reused; one left by an interrupted run (no stamp
# file) is removed and built again. Safe to run again, and concurrently.
#
#   DYNLLM_CACHE   cache root (default: $XDG_CACHE_HOME/dynllm or ~/.cache/dynllm)
#   PYTHON         interpreter for the venv (default: python3)
#
# torch is installed first, pinned, and pinned again beside transformers: pip
# takes torch 2.13.0 (CPU build) from a wheel on this machine's disk, while an
# unpinned torch would download a CUDA build of several GB.
set -euo pipefail

transformers_version="5.24.0"
torch_version="2.13.0"
# What `transformers[serving]` lacks for POST /v1/audio/transcriptions:
# python-multipart parses the upload; soundfile decodes it (WAV/FLAC/OGG/MP3,
# libsndfile ships in its wheel) and soxr resamples it to the model's rate.
# Not `transformers[audio]`: that extra also pulls torchaudio, which wants a
# torch of its own release.
audio_packages=("python-multipart" "soundfile" "soxr")

cache="${DYNLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynllm}"
dest="$cache/transformers-$transformers_version"
exe="$dest/bin/transformers"
stamp="$dest/.dynllm-setup-complete"
python="${PYTHON:-python3}"

# pip notes every missing local find-links folder of this machine's config.
quiet() { grep -v "^WARNING: Location" >&2 || true; }
# The stamp names what was installed, so changing a pin above rebuilds the venv.
spec="torch==$torch_version transformers[serving]==$transformers_version ${audio_packages[*]}"
ready() { [ -x "$exe" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$spec" ]; }

if ready; then
    echo "$exe"
    exit 0
fi

mkdir -p "$cache"
# Serialize concurrent runs (e.g. parallel tests); the loser reuses the result.
if command -v flock >/dev/null; then
    exec 9>"$dest.lock"
    flock 9
    if ready; then
        echo "$exe"
        exit 0
    fi
fi

echo "setup-transformers: installing transformers $transformers_version + torch $torch_version (CPU) into $dest" >&2
rm -rf "$dest"
"$python" -m venv "$dest"
pip=("$dest/bin/python" -m pip --disable-pip-version-check --no-input --quiet)
"${pip[@]}" install "torch==$torch_version" 2>&1 | quiet
# torch pinned again so that nothing here can replace it.
"${pip[@]}" install "torch==$torch_version" "transformers[serving]==$transformers_version" \
    "${audio_packages[@]}" 2>&1 | quiet

# Refuse a CUDA torch (or anything that dragged in nvidia-* wheels).
"$dest/bin/python" - "$torch_version" >&2 <<'PY'
import importlib.metadata as md, sys
import torch
want = sys.argv[1]
problems = []
if torch.__version__.split("+")[0] != want:
    problems.append(f"torch {torch.__version__}, wanted {want}")
if torch.version.cuda is not None:
    problems.append(f"torch is a CUDA build (cuda {torch.version.cuda})")
nvidia = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia"))
if nvidia:
    problems.append("CUDA wheels installed: " + ", ".join(nvidia))
if problems:
    sys.exit("setup-transformers: " + "; ".join(problems))
PY
"$exe" serve --help >/dev/null

echo "$spec" > "$stamp"
echo "$exe"

