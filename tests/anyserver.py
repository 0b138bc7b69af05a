"""
A small OpenAI-compatible server for the tests of C{backend: command}, and
a container-like way to run it.

    anyserver.py serve --port P [--host H | --every-interface] [--api-key K] [--log-ready] [--name N]
    anyserver.py run STATE_DIR NAME -- serve ARGS...   (like `docker run NAME`)
    anyserver.py stop STATE_DIR NAME                    (like `docker stop NAME`)

C{serve} answers C{POST /v1/chat/completions} with the request's C{model}
echoed back, C{GET /v1/models} (behind the key, as vLLM's) and C{GET
/health} (open). With C{--log-ready}, C{/health} always
answers 404 and the only sign of readiness is the line C{ANYSERVER READY}
on standard error: a server whose readiness is a log line only.

C{run} starts C{serve} detached (its own session, not a child of C{run}),
records its pid in C{STATE_DIR/NAME.pid}, relays its output, and waits for
it to exit: killing C{run} (even its whole process group) leaves the server
running, as killing C{docker run} leaves its container. Only C{stop} (or a
signal to the server's own pid) ends it. C{stop} sends SIGTERM to the
recorded pid and waits until it is gone.
"""

import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.abspath(__file__)


def serve(argv):
    options = {"--host": "127.0.0.1", "--port": None, "--api-key": None, "--name": "anyserver"}
    logReady = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--log-ready":
            logReady = True
        elif arg == "--every-interface":
            # As vLLM and SGLang do when not given a host.
            options["--host"] = "0.0.0.0"
        else:
            options[arg] = args.pop(0)
    key = options["--api-key"]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *a):
            sys.stderr.write("anyserver: " + format % a + "\n")

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health" and not logReady:
                self.answer(200, {"status": "ok"})
            elif self.path == "/v1/models":
                if key and self.headers.get("Authorization") != "Bearer " + key:
                    self.answer(401, {"error": {"message": "bad key"}})
                else:
                    self.answer(200, {"object": "list", "data": [{"id": options["--name"], "object": "model"}]})
            else:
                self.answer(404, {"error": "not found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            sys.stderr.write(f"anyserver: request for model {body.get('model')!r}\n")
            if key and self.headers.get("Authorization") != "Bearer " + key:
                self.answer(401, {"error": {"message": "bad key"}})
                return
            if self.path != "/v1/chat/completions":
                self.answer(404, {"error": "not found"})
                return
            self.answer(200, {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "hello from " + options["--name"]}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })

    server = ThreadingHTTPServer((options["--host"], int(options["--port"])), Handler)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    sys.stderr.write(f"anyserver: pid {os.getpid()} warming up\n")
    sys.stderr.flush()
    if logReady:
        time.sleep(0.2)
        sys.stderr.write("anyserver: ANYSERVER READY\n")
        sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        sys.stderr.write("anyserver: stopped\n")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] not in (b"Z", b"X")


def run(state, name, argv):
    log = os.path.join(state, name + ".log")
    pidFile = os.path.join(state, name + ".pid")
    # Double fork: the server is nobody's child here, in a session of its own.
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        with open(pidFile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pidFile + ".tmp", pidFile)
        os.execv(sys.executable, [sys.executable, HERE, *argv])
    os.waitpid(child, 0)
    while not os.path.exists(pidFile):
        time.sleep(0.01)
    with open(pidFile) as f:
        pid = int(f.read())
    print(f"run: {name} is pid {pid}", flush=True)
    # Relay the server's output until it exits.
    position = 0
    while True:
        with open(log, "rb") as f:
            f.seek(position)
            data = f.read()
        if data:
            position += len(data)
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        if not alive(pid):
            print(f"run: {name} exited", flush=True)
            return 0
        time.sleep(0.02)


def stop(state, name):
    pidFile = os.path.join(state, name + ".pid")
    try:
        with open(pidFile) as f:
            pid = int(f.read())
    except OSError:
        print(f"stop: no {name}", flush=True)
        return 0
    print(f"stop: stopping {name} (pid {pid})", flush=True)
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.unlink(pidFile)
    return 0


def main(argv):
    command = argv[0]
    if command == "serve":
        serve(argv[1:])
        return 0
    if command == "run":
        state, name, dashes, *rest = argv[1:]
        assert dashes == "--"
        return run(state, name, rest)
    if command == "stop":
        return stop(argv[1], argv[2])
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
