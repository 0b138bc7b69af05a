#!/usr/bin/env bash
# Install dynllm and what its demo needs, from a fresh checkout:
#   - a virtualenv in .venv with dynllm installed (editable),
#   - llama-server built from source into the cache (once; about 12 minutes
#     on 2 cores) unless DYNLLM_LLAMA_SERVER names one,
#   - a tiny random-weight chat model and a demo configuration using it.
# Then prints the command that runs the daemon. Safe to run again.
#
#   DYNLLM_CACHE          cache root (default: ~/.cache/dynllm)
#   DYNLLM_LLAMA_SERVER   use this llama-server instead of building one
#   DYNLLM_EXTRAS         pip extras to install (default: none; CI uses "test")
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
cache="${DYNLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynllm}"
extras="${DYNLLM_EXTRAS:+[$DYNLLM_EXTRAS]}"

quiet() { grep -v "^WARNING: Location" || true; }

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip 2>&1 | quiet
.venv/bin/pip install --quiet -e ".$extras" gguf numpy 2>&1 | quiet
# Register the twistd plugin (the dropin lives at the top of the checkout).
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$root" > "$site/dynllm-checkout.pth"

server="${DYNLLM_LLAMA_SERVER:-$(bash tools/build-llama-server.sh | tail -n 1)}"

demo="$cache/demo"
mkdir -p "$demo"
[ -f "$demo/tiny-chat.gguf" ] || .venv/bin/python tools/make_tiny_gguf.py "$demo/tiny-chat.gguf" >/dev/null
cat > "$demo/dynllm.yaml" <<YAML
# A demo configuration written by tools/quickstart.sh: one tiny random-weight
# model (it answers gibberish, quickly). Copy etc/dynllm.example.yaml for real use.
server:
  host: 127.0.0.1
  port: 8000
total_vram_mb: 1024
idle_timeout_seconds: 300
enabled_backends: [llamacpp]
db_path: $demo/state.db
backend:
  llamacpp_binary: $server
models:
  - name: tiny-chat
    path: $demo/tiny-chat.gguf
    backend: llamacpp
    vram_mb: 100
    context_size: 512
YAML

cat <<MSG
dynllm is installed. Run it with:

    .venv/bin/twistd -n dynllm --config $demo/dynllm.yaml

then, in another terminal:

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello!"}]}'
MSG
