"""
Shared helpers of the integration tests: the real llama-server and
C{transformers serve}, tiny models made by the project's own generators, and
a real dynllm daemon run as a subprocess (C{twistd -n dynllm}) with a
generated configuration.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import yaml
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from dynllm.runner import portIsFree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_BACKEND = os.path.join(ROOT, "tests", "fakebackend.py")
CACHE = os.environ.get("DYNLLM_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dynllm"
)

#: twistd of the Python running the tests.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

@functools.cache
def _setUpProgram(variable: str, script: str, label: str) -> str:
    """
    @param variable: The environment variable that may name the program.
    @param script: The script under C{tools/} that makes it in the cache
        when the variable is unset (it prints the path on its last line).
    @param label: What the program is, for the message if it is unusable.
    @return: the path of the program.
    """
    path = os.environ.get(variable)
    if not path:
        result = subprocess.run(
            ["bash", os.path.join(ROOT, "tools", script)], stdout=subprocess.PIPE, check=True, text=True
        )
        path = result.stdout.strip().splitlines()[-1]
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{label} {path!r} is not an executable file")
    return path


def llamaServer() -> str:
    """
    @return: the path of a llama-server binary: C{$DYNLLM_LLAMA_SERVER} if
        set, else the project's cached build (built now if missing, which
        takes several minutes).
    """
    return _setUpProgram("DYNLLM_LLAMA_SERVER", "build-llama-server.sh", "llama-server")


def transformersServe() -> str:
    """
    @return: the path of a C{transformers} program with C{transformers serve}:
        C{$DYNLLM_TRANSFORMERS} if set, else the project's cached virtualenv
        (made now if missing, which takes a minute or two).
    """
    return _setUpProgram("DYNLLM_TRANSFORMERS", "setup-transformers.sh", "transformers")


def _generate(python: str, generator: str, prefix: str, outputs: dict[str, list[str]], **kw: Any) -> dict[str, str]:
    """
    Run a model generator of C{tools/} once per output, into the cache: in
    a directory keyed by the generator's contents, so that a changed
    generator makes new models.

    @param python: The interpreter to run it with.
    @param prefix: Starts the name of the cache directory.
    @param outputs: Output name -> the generator's other arguments.
    @param kw: More arguments for C{subprocess.run}.
    @return: output name -> absolute path.
    """
    script = os.path.join(ROOT, "tools", generator)
    with open(script, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    directory = os.path.join(CACHE, f"{prefix}-{digest}")
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, args in outputs.items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            subprocess.run([python, script, path + ".tmp", *args], check=True, stdout=subprocess.DEVNULL, **kw)
            os.replace(path + ".tmp", path)
        paths[name] = path
    return paths


#: The tiny models the tests use: file name -> generator arguments.
TINY_MODELS = {
    "tiny-llama.gguf": [],
    "tiny-embed.gguf": ["--pooling", "mean"],
    "tiny-rerank.gguf": ["--arch", "qwen3", "--rerank"],
}


def tinyModels() -> dict[str, str]:
    """
    Generate the tiny random-weight GGUF models once (they are cached).

    @return: file name -> absolute path.
    """
    return _generate(sys.executable, "make_tiny_gguf.py", "models", TINY_MODELS)


def tinyHFModels() -> dict[str, str]:
    """
    Generate the tiny random-weight Hugging Face models (a chat model and a
    Whisper model) once, with the Python of L{transformersServe}; they are
    cached.

    @return: kind (C{llm}, C{whisper}) -> model directory.
    """
    python = os.path.join(os.path.dirname(transformersServe()), "python")
    made = _generate(
        python,
        "make_tiny_hf.py",
        "hf",
        {f"tiny-{kind}": ["--kind", kind] for kind in ("llm", "whisper")},
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    return {kind: made[f"tiny-{kind}"] for kind in ("llm", "whisper")}


def freePort() -> int:
    """
    @return: a TCP port that was free on 127.0.0.1 a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def freePortRange(size: int = 20) -> tuple[int, int]:
    """
    @return: C{(start, end)} of a block of ports that are free now, for
        backends.
    """
    for _ in range(50):
        start = freePort()
        if start + size >= 65535:
            continue
        ports = range(start, start + size)
        if all(portIsFree(p) for p in ports):
            return start, start + size - 1
    raise RuntimeError("no free block of ports")


def request(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, dict[str, str], bytes]:
    """
    Send one HTTP request.

    @param body: bytes, or a value sent as JSON; either is sent as
        C{application/json} unless C{headers} give another C{Content-Type}
        (urllib would send a form's, which a daemon without keys refuses:
        L{dynllm.guard}).
    @return: C{(status, headers, body)}, for error statuses too.
    """
    data = body
    headers = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        data = json.dumps(body).encode()
    if body is not None and not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def rawPost(port: int, path: str, body: Any, timeout: float = 30) -> bytes:
    """
    POST C{body} (sent as JSON) to C{path} on 127.0.0.1:C{port} over a raw
    socket, asking the server to close after its answer, and read until it
    does: for what a client library would hide (loading comments, a cut
    chunked body).

    @return: every byte the server sent, head included.
    """
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data)
        )
        received = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                return received
            received += piece


def checkEnvelope(case: Any, status: int, body: bytes, expected: int, code: str | None = None) -> dict[str, Any]:
    """
    Assert that a response is an OpenAI error envelope with status
    C{expected} (and error code C{code}, if given).

    @param case: The test case that asserts.
    @return: the C{error} object.
    """
    case.assertEqual(status, expected, body)
    error: dict[str, Any] = json.loads(body)["error"]
    case.assertEqual(sorted(error), ["code", "message", "param", "type"])
    if code is not None:
        case.assertEqual(error["code"], code)
    return error


def commandLine(pid: int) -> list[str]:
    """
    @return: the command line of process C{pid}.
    """
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def environmentOf(pid: int) -> dict[str, str]:
    """
    @return: the environment process C{pid} started with (readable by its
        own user only, unlike its command line).
    """
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = [e.decode() for e in f.read().split(b"\0") if e]
    return dict(e.partition("=")[::2] for e in entries)


def flag(args: list[str], name: str) -> str | None:
    """
    @return: the value after option C{name} in C{args}, or C{None}.
    """
    return args[args.index(name) + 1] if name in args else None


def pidAlive(pid: int) -> bool:
    """
    @return: whether C{pid} is a running (not zombie) process.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def waitFor(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """
    @return: whether C{predicate()} became true within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


#: Daemons started and not yet stopped: killed when the test run exits, so
#: that a test whose cleanup failed still leaves no process behind.
_running: set[subprocess.Popen[bytes]] = set()


#: Directories made for daemons, removed when the test run exits unless
#: DYNLLM_KEEP_TEST_DIRS is set.
_directories: list[str] = []


@atexit.register
def _stopLeftovers() -> None:
    # SIGTERM first, so that each daemon stops its backends as usual.
    for process in list(_running):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if not os.environ.get("DYNLLM_KEEP_TEST_DIRS"):
        for directory in _directories:
            shutil.rmtree(directory, ignore_errors=True)


class Daemon:
    """
    A real dynllm daemon, C{twistd -n dynllm --config CONFIG}, in a subprocess.

    @ivar config: The configuration mapping written to the file.
    @ivar url: C{http://127.0.0.1:PORT}.
    """

    def __init__(self, config: dict[str, Any], directory: str | None = None) -> None:
        if directory is None:
            directory = tempfile.mkdtemp(prefix="dynllm-test-")
            _directories.append(directory)
        self.directory = directory
        self.port = freePort()
        start, end = freePortRange()
        config = dict(config)
        server = dict(config.get("server", {}))
        server.setdefault("host", "127.0.0.1")
        server.setdefault("port", self.port)
        config["server"] = server
        config.setdefault("db_path", os.path.join(self.directory, "state.db"))
        backend = dict(config.get("backend", {}))
        backend.setdefault("port_range_start", start)
        backend.setdefault("port_range_end", end)
        config["backend"] = backend
        self.config = config
        self.configPath = os.path.join(self.directory, "dynllm.yaml")
        with open(self.configPath, "w") as f:
            yaml.safe_dump(config, f)
        self.logPath = os.path.join(self.directory, "dynllm.log")
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True, twistdOptions: tuple[str, ...] = ()) -> Daemon:
        """
        Start the daemon and wait until C{/health} answers 200.

        @param twistdOptions: More options for twistd itself (such as
            C{--logger=...}).
        """
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", *twistdOptions, "dynllm", "--config", self.configPath],
            cwd=self.directory,
            env=env,
            stdout=open(self.logPath, "ab"),
            stderr=subprocess.STDOUT,
        )
        _running.add(self.process)
        if wait and not waitFor(self._healthy, timeout=30):
            self.stop()
            raise RuntimeError(f"dynllm did not become healthy; log:\n{self.log()}")
        return self

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"dynllm exited with {self.process.returncode}; log:\n{self.log()}")
        try:
            return self.get("/health")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        """
        @return: everything the daemon printed so far.
        """
        with open(self.logPath, errors="replace") as f:
            return f.read()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return request("GET", self.url + path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return request("POST", self.url + path, body, **kw)

    def models(self) -> dict[str, dict[str, Any]]:
        """
        @return: C{/admin/models} as name -> entry.
        """
        server = self.config["server"]
        keys = server.get("admin_api_keys") or server.get("api_keys")
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        status, _, body = self.get("/admin/models", headers=headers)
        assert status == 200, body
        return {m["name"]: m for m in json.loads(body)["models"]}

    def stop(self, timeout: float = 30) -> int | None:
        """
        Send SIGTERM and wait for the daemon to exit.

        @return: its exit status.
        """
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            _running.discard(self.process)

    def kill9(self) -> None:
        """
        Kill the daemon with SIGKILL, as a crash would, and reap it.
        """
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        _running.discard(self.process)


def fakeModel(name: str, vram: int = 400, **env: Any) -> dict[str, Any]:
    """
    @return: a model served by the fake backend (L{FAKE_BACKEND}), with
        C{env} telling it how to behave (C{fake_load_delay=3} sets
        C{FAKE_LOAD_DELAY=3}).
    """
    return {
        "name": name,
        "path": tinyModels()["tiny-llama.gguf"],
        "backend": "llamacpp",
        "vram_mb": vram,
        "env": {k.upper(): str(v) for k, v in env.items()},
    }


@implementer(IPushProducer)
class BodyTransport:
    """
    The transport of a fake backend response's body: a push producer that
    records whether the relay stopped it.
    """

    def __init__(self) -> None:
        self.stopped = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    """
    A backend's response whose body the test writes by hand, through
    C{self.body} (the relay's protocol) once C{deliverBody} was called.
    """

    def __init__(self, code: int, headers: dict[bytes, list[bytes]], phrase: bytes = b"Whatever") -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers(headers)
        self.length = None
        self.body: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.body = protocol
        protocol.makeConnection(BodyTransport())

    def finish(self, data: bytes = b"") -> None:
        """
        Write C{data} and end the body.
        """
        if data:
            self.body.dataReceived(data)
        self.body.connectionLost(Failure(ResponseDone()))
