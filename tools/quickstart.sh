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
#   DYNLLM_PORT           the port the demo daemon listens on (default: 8000)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
cache="${DYNLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynllm}"
extras="${DYNLLM_EXTRAS:+[$DYNLLM_EXTRAS]}"
port="${DYNLLM_PORT:-8000}"
if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || (( 10#$port < 1 || 10#$port > 65535 )); then
    echo "tools/quickstart.sh: DYNLLM_PORT must be a port number between 1 and 65535, not '$port'" >&2
    exit 1
fi
port=$((10#$port))

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
[ -f "$demo/tiny-embed.gguf" ] || .venv/bin/python tools/make_tiny_gguf.py --pooling mean "$demo/tiny-embed.gguf" >/dev/null
[ -f "$demo/tiny-rerank.gguf" ] || .venv/bin/python tools/make_tiny_gguf.py --arch qwen3 --rerank "$demo/tiny-rerank.gguf" >/dev/null
cat > "$demo/dynllm.yaml" <<YAML
# A demo configuration written by tools/quickstart.sh: tiny random-weight
# models for chat, embeddings and ranking (they answer gibberish, quickly).
# Copy etc/dynllm.example.yaml for real use.
server:
  host: 127.0.0.1
  port: $port
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
  - name: tiny-embed
    path: $demo/tiny-embed.gguf
    backend: llamacpp
    model_type: embedding
    vram_mb: 100
    context_size: 512
  - name: tiny-rerank
    path: $demo/tiny-rerank.gguf
    backend: llamacpp
    model_type: rerank
    vram_mb: 100
    context_size: 512
YAML

cat <<MSG
dynllm is installed. Run it with:

    .venv/bin/twistd -n --pidfile= dynllm --config $demo/dynllm.yaml

then open the console at http://127.0.0.1:$port/ui/ or, in another terminal:

    curl http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello!"}]}'
MSG

# Is the port free now? Tried as the daemon binds it (SO_REUSEADDR, as
# Twisted does), so that only a port something listens on counts as taken.
# Installing went well either way: this only says what to change.
taken="$(.venv/bin/python - "$port" <<'PY'
import socket, sys

def refusal(port):
    """Why 127.0.0.1:port cannot be bound now, or None."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.strerror.lower()
    return None

port = int(sys.argv[1])
why = refusal(port)
if why is not None:
    spare = next((p for p in range(port + 1, min(port + 100, 65536)) if refusal(p) is None), port + 1)
    print(f"NOTE: port {port} on 127.0.0.1 is taken ({why}), so dynllm cannot listen there:"
          f" run this again with a free one, e.g. DYNLLM_PORT={spare} bash tools/quickstart.sh")
PY
)"
if [ -n "$taken" ]; then
    echo >&2
    echo "$taken" >&2
fi
