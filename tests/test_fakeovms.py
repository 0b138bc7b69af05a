"""
Tests for tests/fakeovms.py, the stand-in for OpenVINO Model Server: they
prove that it takes OVMS's command line, rejects what OVMS rejects, and
answers OVMS's REST API (readiness table, error shapes, each task's
endpoint) as described in backends.md section 3.

Each test runs the fake as a child process and talks to it with http.client.
"""

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from tests import fakeovms

FAKE = os.path.abspath(fakeovms.__file__)
EX_USAGE = 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOG_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\]\[\d+\]\[[a-z_]+\]"
    r"\[(trace|debug|info|warning|error)\]\[[\w.]+:\d+\] .*$"
)


def freePort() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def cleanEnvironment(extra: dict | None = None) -> dict:
    """The environment for a fake: no inherited knobs; no load delay unless asked."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FAKE_OVMS_") and k != "API_KEY"
    }
    env["FAKE_OVMS_LOAD_DELAY"] = "0"
    env.update(extra or {})
    return env


def runFake(args: list, env: dict | None = None, timeout: float = 10):
    """Run the fake to completion; return (exit code, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, FAKE, *args],
        capture_output=True,
        env=cleanEnvironment(env),
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


class Response:
    def __init__(self, status: int, headers: dict, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    body=None,
    headers: dict | None = None,
    timeout: float = 10,
) -> Response:
    """One HTTP request; a dict or list body is sent as application/json."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return Response(
            response.status, {k.lower(): v for k, v in response.getheaders()}, data
        )
    finally:
        connection.close()


def multipart(
    fields: dict, files: dict, boundary: str = "fakeOvmsBoundary7MA4YWxk"
) -> tuple:
    """Encode a multipart/form-data body; return (body, content type)."""
    chunks = []
    for name, value in fields.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, (filename, data) in files.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def sseFrames(body: bytes) -> list:
    """The ``data:`` payloads of a server-sent-events body, in order."""
    frames = []
    for event in body.decode().split("\n\n"):
        for line in event.split("\n"):
            if line.startswith("data: "):
                frames.append(line[len("data: ") :])
    return frames


class FakeOVMSCase(SynchronousTestCase):
    """Starts fakes and makes model directories; stops every fake in cleanup."""

    def modelDir(self, kind: str = "plain", graph: str | None = None) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        if kind == "classic":
            os.makedirs(os.path.join(path, "1"))
            with open(os.path.join(path, "1", "model.xml"), "w") as f:
                f.write("<net/>")
        if graph is not None:
            with open(os.path.join(path, "graph.pbtxt"), "w") as f:
                f.write(
                    f'input_stream: "HTTP_REQUEST_PAYLOAD:input"\nnode {{\n  calculator: "{graph}"\n}}\n'
                )
        return path

    def start(
        self,
        args: list,
        env: dict | None = None,
        port: int | None = None,
        name: str = "m",
        waitReady: bool = True,
    ):
        """Start the fake serving REST on a free port; return (process, port)."""
        port = port or freePort()
        stderrPath = os.path.abspath(self.mktemp())
        stderrFile = open(stderrPath, "wb")  # noqa: SIM115 - closed in cleanup
        process = subprocess.Popen(
            [
                sys.executable,
                FAKE,
                "--rest_port",
                str(port),
                "--rest_bind_address",
                "127.0.0.1",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderrFile,
            env=cleanEnvironment(env),
        )
        process.stderrPath = stderrPath

        def stop():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            stderrFile.close()

        self.addCleanup(stop)
        self.waitBound(process, port)
        if waitReady:
            self.waitFor(
                lambda: call(port, "GET", f"/v2/models/{name}/ready").status == 200
            )
        return process, port

    def stderrOf(self, process) -> str:
        with open(process.stderrPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def waitBound(self, process, port: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.fail(
                    f"fake exited with {process.returncode}:\n{self.stderrOf(process)}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.01)
        self.fail("fake did not bind its REST port")

    def waitFor(self, condition, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.02)
        self.fail("condition not reached in time")

    def assertError(self, response: Response, status: int, message: str) -> None:
        self.assertEqual(
            (response.status, response.json()),
            (status, {"error": message}),
            response.body,
        )
        self.assertEqual(response.headers["content-type"], "application/json")

    def graph(
        self,
        task: str,
        env: dict | None = None,
        extra: list | None = None,
        name: str = "m",
    ):
        """A --task graph named ``name``, started and AVAILABLE; return (process, port)."""
        args = [
            "--model_name",
            name,
            "--model_path",
            self.modelDir(),
            "--task",
            task,
            *(extra or []),
        ]
        return self.start(args, env=env, name=name)


class CommandLineTests(FakeOVMSCase):
    """The command line: what OVMS accepts and what it refuses (exit 64, message on stderr)."""

    def singleModel(self, *more: str) -> list:
        """The arguments of a valid single-model server, then C{more}."""
        return ["--rest_port", "9001", "--model_name", "m", "--model_path", self.modelDir(), *more]

    def refuse(self, args: list, message: str) -> None:
        code, _out, err = runFake(args)
        self.assertEqual(code, EX_USAGE, err)
        self.assertIn(message, err)

    def test_bothPortsUnsetRefused(self):
        """Without --port and --rest_port (both default to 0) OVMS refuses to start."""
        self.refuse(
            ["--model_name", "m", "--model_path", self.modelDir()],
            "port and rest_port cannot both be unset",
        )

    def test_bothPortsZeroRefused(self):
        """Explicit --port 0 --rest_port 0 is refused the same way."""
        args = [
            "--port",
            "0",
            "--rest_port=0",
            "--model_name",
            "m",
            "--model_path",
            self.modelDir(),
        ]
        self.refuse(args, "port and rest_port cannot both be unset")

    def test_equalPortsRefused(self):
        """The gRPC and REST ports cannot be the same non-zero number."""
        args = [
            "--port",
            "9000",
            "--rest_port",
            "9000",
            "--model_name",
            "m",
            "--model_path",
            self.modelDir(),
        ]
        self.refuse(args, "port and rest_port cannot have the same values")

    def test_portOutOfRangeRefused(self):
        """A port above 65535 is out of range; a non-number does not parse."""
        args = [
            "--rest_port",
            "70000",
            "--model_name",
            "m",
            "--model_path",
            self.modelDir(),
        ]
        self.refuse(args, "rest_port number out of range from 0 to 65535")
        self.refuse(
            ["--rest_port", "abc", "--model_name", "m", "--model_path", "x"],
            "Argument 'abc' failed to parse",
        )

    def test_unknownOptionRefused(self):
        """An unknown option (and its value) is an unmatched argument."""
        args = [
            "--rest_port",
            "9001",
            "--frobnicate",
            "1",
            "--model_name",
            "m",
            "--model_path",
            self.modelDir(),
        ]
        self.refuse(
            args, "error parsing options - unmatched arguments: --frobnicate, 1, "
        )

    def test_boolWithSeparateValueRefused(self):
        """Boolean flags take no separate value: ``--metrics_enable true`` leaves ``true`` unmatched."""
        args = [
            "--rest_port",
            "9001",
            "--metrics_enable",
            "true",
            "--model_name",
            "m",
            "--model_path",
            self.modelDir(),
        ]
        self.refuse(args, "unmatched arguments: true, ")

    def test_missingValueRefused(self):
        """An option that needs a value cannot end the command line."""
        self.refuse(
            ["--rest_port", "9001", "--model_name"],
            "Option 'model_name' is missing an argument",
        )

    def test_badTaskRefused(self):
        """--task accepts only OVMS's six tasks."""
        args = self.singleModel("--task", "chat")
        self.refuse(args, "--task parameter unsupported value: chat")

    def test_taskOptionWithoutTaskRefused(self):
        """Task options are parsed only in task mode; without --task they are unmatched."""
        args = self.singleModel("--max_num_seqs", "4")
        self.refuse(args, "unmatched arguments: --max_num_seqs, 4, ")

    def test_otherTasksOptionRefused(self):
        """A task accepts only its own options: embeddings has no --max_num_seqs."""
        args = self.singleModel()
        args += ["--task", "embeddings", "--max_num_seqs", "4"]
        self.refuse(
            args,
            "task: embeddings - error parsing options - unmatched arguments : --max_num_seqs, 4, ",
        )

    def test_badTaskOptionValuesRefused(self):
        """Task option values are validated: pipeline_type and true/false switches."""
        base = self.singleModel("--task", "text_generation")
        self.refuse(
            [*base, "--pipeline_type", "FAST"], "pipeline_type: FAST is not allowed"
        )
        self.refuse(
            [*base, "--enable_prefix_caching", "yes"],
            "enable_prefix_caching: yes is not allowed",
        )

    def test_configPathWithModelPathRefused(self):
        """--config_path is exclusive with --model_name/--model_path."""
        args = [
            "--rest_port",
            "9001",
            "--config_path",
            "/x/config.json",
            "--model_path",
            self.modelDir(),
        ]
        self.refuse(args, "Use either config_path or model_path with model_name")

    def test_configPathWithModelParametersRefused(self):
        """--config_path is exclusive with single-model parameters such as --target_device."""
        args = [
            "--rest_port",
            "9001",
            "--config_path",
            "/x/config.json",
            "--target_device",
            "CPU",
        ]
        self.refuse(args, "Model parameters in CLI are exclusive with the config file")

    def test_noModelRefused(self):
        """A server needs --config_path, or --model_path with --model_name."""
        self.refuse(
            ["--rest_port", "9001"], "Use config_path or model_path with model_name"
        )
        self.refuse(
            ["--rest_port", "9001", "--model_path", self.modelDir()],
            "Use config_path or model_path with model_name",
        )

    def test_badLogLevelAndAddressRefused(self):
        """--log_level must be a known level and --rest_bind_address a host name or IP address."""
        base = self.singleModel()
        self.refuse(
            [*base, "--log_level", "LOUD"],
            "log_level should be one of: TRACE, DEBUG, INFO, WARNING, ERROR",
        )
        self.refuse(
            [*base, "--rest_bind_address", "no_such!host"],
            "rest_bind_address has invalid format",
        )

    def test_versionAndHelp(self):
        """--version and --help (or no arguments at all) print to stdout and exit 0."""
        code, out, err = runFake(["--version"])
        self.assertEqual(code, 0, err)
        self.assertIn("OpenVINO Model Server 2026.3.0", out)
        for args in (["--help"], []):
            code, out, err = runFake(args)
            self.assertEqual(code, 0, err)
            self.assertIn("--rest_port", out)

    def test_launcher(self):
        """launcher() writes an executable ``ovms`` wrapper that runs the fake with this interpreter."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = fakeovms.launcher(directory)
        self.assertEqual(path, os.path.join(directory, "ovms"))
        self.assertTrue(os.access(path, os.X_OK))
        with open(path) as f:
            script = f.read()
        self.assertTrue(script.startswith("#!/bin/sh\nexec "))
        self.assertIn(sys.executable, script)
        done = subprocess.run(
            [path, "--version"],
            capture_output=True,
            env=cleanEnvironment(),
            timeout=10,
            check=False,
        )
        self.assertEqual(done.returncode, 0)
        self.assertIn(b"OpenVINO Model Server", done.stdout)
        done = subprocess.run(
            [path, "--rest_port", "1"],
            capture_output=True,
            env=cleanEnvironment(),
            timeout=10,
            check=False,
        )
        self.assertEqual(done.returncode, EX_USAGE)


class StartupTests(FakeOVMSCase):
    """Start-up: binding, logs, load delay and the readiness table while loading."""

    def test_bindsQuickly(self):
        """The REST port accepts connections within 0.5 s of the process start (best of three)."""
        best = 10.0
        for _ in range(3):
            port = freePort()
            began = time.monotonic()
            process = subprocess.Popen(
                [
                    sys.executable,
                    FAKE,
                    "--rest_port",
                    str(port),
                    "--model_name",
                    "m",
                    "--model_path",
                    self.modelDir(),
                ],
                stderr=subprocess.DEVNULL,
                env=cleanEnvironment(),
            )
            self.addCleanup(process.wait, 5)
            self.addCleanup(process.kill)
            self.waitBound(process, port)
            best = min(best, time.monotonic() - began)
        self.assertLess(best, 0.5)

    def test_logs(self):
        """stderr carries spdlog-style lines: version, the argv, the gRPC and REST binding, the graph turning AVAILABLE."""
        process, port = self.graph("text_generation")
        self.waitFor(lambda: "ServableManagerModule started" in self.stderrOf(process))
        log = self.stderrOf(process)
        lines = log.splitlines()
        for line in lines:
            self.assertRegex(line, LOG_LINE)
        self.assertIn("OpenVINO Model Server 2026.3.0-fake", log)
        self.assertIn('"--rest_bind_address", "127.0.0.1"', log)
        self.assertIn("Port was not set. GRPC server will not be started.", log)
        self.assertIn(f"Binding REST server to address: 127.0.0.1:{port}", log)
        self.assertIn(f"Started REST server at 127.0.0.1:{port}", log)
        self.assertIn("Mediapipe: m state changed to: AVAILABLE", log)

    def test_argvFile(self):
        """FAKE_OVMS_ARGV_FILE receives the argv and pid, so tests can check the exact command line."""
        argvFile = os.path.abspath(self.mktemp())
        process, port = self.graph("embeddings", env={"FAKE_OVMS_ARGV_FILE": argvFile})
        with open(argvFile) as f:
            recorded = json.load(f)
        self.assertEqual(recorded["pid"], process.pid)
        self.assertEqual(
            recorded["argv"][:4],
            ["--rest_port", str(port), "--rest_bind_address", "127.0.0.1"],
        )
        self.assertIn("--task", recorded["argv"])

    def test_pullAndStart(self):
        """--source_model with --model_repository_path serves the local copy under the source name; offline it exits 1."""
        repository = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(repository, "OpenVINO", "tiny-ov"))
        args = [
            "--source_model",
            "OpenVINO/tiny-ov",
            "--model_repository_path",
            repository,
            "--task",
            "text_generation",
        ]
        _process, port = self.start(args, name="OpenVINO%2Ftiny-ov")
        request = {"model": "OpenVINO/tiny-ov", "prompt": "x"}
        self.assertEqual(call(port, "POST", "/v3/completions", request).status, 200)
        args = ["--rest_port", str(freePort()), "--source_model", "OpenVINO/absent-ov"]
        args += ["--model_repository_path", repository, "--task", "text_generation"]
        code, _out, err = runFake(args)
        self.assertEqual(code, 1, err)
        self.assertIn("Error during model download: OpenVINO/absent-ov", err)
        code, _out, err = runFake(
            ["--rest_port", "9001", "--source_model", "OpenVINO/absent-ov"]
        )
        self.assertEqual(code, EX_USAGE)
        self.assertIn("failed to download model config file", err)

    def test_defaultBindAddressAndGrpcPort(self):
        """Without --rest_bind_address the fake binds 0.0.0.0, like OVMS; a --port binds gRPC too."""
        port, grpcPort = freePort(), freePort()
        stderrPath = os.path.abspath(self.mktemp())
        with open(stderrPath, "wb") as stderrFile:
            process = subprocess.Popen(
                [
                    sys.executable,
                    FAKE,
                    "--rest_port",
                    str(port),
                    "--port",
                    str(grpcPort),
                ]
                + ["--model_name", "m", "--model_path", self.modelDir("classic")],
                stderr=stderrFile,
                env=cleanEnvironment(),
            )
        process.stderrPath = stderrPath
        self.addCleanup(process.wait, 5)
        self.addCleanup(process.terminate)
        self.waitBound(process, port)
        socket.create_connection(("127.0.0.1", grpcPort), timeout=2).close()
        self.waitFor(lambda: "STATUS CHANGE" in self.stderrOf(process))
        log = self.stderrOf(process)
        self.assertIn(f"Binding REST server to address: 0.0.0.0:{port}", log)
        self.assertIn(f"Started gRPC server on port {grpcPort}", log)
        self.assertIn(
            'STATUS CHANGE: Version 1 of model m status change. New status: ( "state": "AVAILABLE", "error_code": "OK" )',
            log,
        )

    def test_loadingStateTable(self):
        """
        While a task graph loads for the first time OVMS does not know its
        name (backends.md 3.3 as corrected in 3.9): 404 on /v2 and at once
        on /v3, absent from the lists; afterwards all answer 200.
        """
        path = self.modelDir()
        args = ["--model_name", "m", "--model_path", path, "--task", "text_generation"]
        _process, port = self.start(
            args, env={"FAKE_OVMS_LOAD_DELAY": "1.2"}, waitReady=False
        )
        live = call(port, "GET", "/v2/health/live")
        self.assertEqual((live.status, live.body), (200, b""))
        self.assertError(
            call(port, "GET", "/v2/health/ready"), 503, "Server is not ready"
        )
        self.assertError(
            call(port, "GET", "/v2/models/m/ready"),
            404,
            "Model with requested name is not found",
        )
        self.assertError(
            call(port, "GET", "/v2/models/m/versions/1/ready"),
            404,
            "Model with requested name is not found",
        )
        self.assertError(
            call(port, "GET", "/v2/models/m"), 404, "Model with requested name is not found"
        )
        self.assertError(
            call(port, "GET", "/v2/models/other/ready"),
            404,
            "Model with requested name is not found",
        )
        self.assertEqual(
            call(port, "GET", "/v3/models").json(), {"data": [], "object": "list"}
        )
        self.assertError(call(port, "GET", "/v3/models/m"), 500, "Model not found")
        self.assertEqual(call(port, "GET", "/v1/config").body, b"{}")
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        began = time.monotonic()
        for path in ("/v3/chat/completions", "/v1/chat/completions"):
            self.assertError(
                call(port, "POST", path, chat),
                404,
                "Mediapipe graph definition with requested name is not found",
            )
        self.assertLess(time.monotonic() - began, 0.4)

        self.waitFor(lambda: call(port, "GET", "/v2/models/m/ready").status == 200)
        ready = call(port, "GET", "/v2/models/m/ready")
        self.assertEqual(ready.body, b"")
        self.assertEqual(call(port, "GET", "/v2/health/ready").status, 200)
        self.assertEqual(call(port, "POST", "/v3/chat/completions", chat).status, 200)
        models = call(port, "GET", "/v3/models").json()
        self.assertEqual([m["id"] for m in models["data"]], ["m"])
        self.assertEqual(models["data"][0]["owned_by"], "OVMS")
        self.assertIsInstance(models["data"][0]["created"], int)
        self.assertEqual(call(port, "GET", "/v1/models").json(), models)
        self.assertEqual(call(port, "GET", "/v3/models/m").json()["id"], "m")
        self.assertIn(
            '"state": "AVAILABLE"', call(port, "GET", "/v1/config").body.decode()
        )

    def test_classicModelLoadingTable(self):
        """
        A classic model is known from the start: while it loads, its
        /ready is 404 "not loaded yet" and /v1/config shows it LOADING.
        """
        args = ["--model_name", "m", "--model_path", self.modelDir("classic")]
        _process, port = self.start(
            args, env={"FAKE_OVMS_LOAD_DELAY": "1.2"}, waitReady=False
        )
        self.assertError(
            call(port, "GET", "/v2/models/m/ready"),
            404,
            "Model with requested version is not loaded yet",
        )
        self.assertIn('"state": "LOADING"', call(port, "GET", "/v1/config").body.decode())

    def test_failedLoad(self):
        """
        FAKE_OVMS_FAIL_LOAD in --config_path mode: the server stays up, the
        graph never turns ready, /v1/config says FAILED_PRECONDITION, and a
        request waits 0.5 s for it, then gets 500.
        """
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "m"))
        with open(os.path.join(root, "m", "graph.pbtxt"), "w") as f:
            f.write('node { calculator: "HttpLLMCalculator" }\n')
        configPath = os.path.join(root, "config.json")
        with open(configPath, "w") as f:
            json.dump({"model_config_list": [], "mediapipe_config_list": [{"name": "m", "base_path": "m"}]}, f)
        process, port = self.start(
            ["--config_path", configPath], env={"FAKE_OVMS_FAIL_LOAD": "1"}, waitReady=False
        )
        self.waitFor(lambda: call(port, "GET", "/v2/health/ready").status == 200)
        self.assertError(
            call(port, "GET", "/v2/models/m/ready"),
            404,
            "Model with requested version is not loaded yet",
        )
        config = call(port, "GET", "/v1/config").body.decode()
        self.assertIn('"state": "LOADING"', config)
        self.assertIn('"error_code": "FAILED_PRECONDITION"', config)
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        began = time.monotonic()
        self.assertError(
            call(port, "POST", "/v3/chat/completions", chat),
            500,
            "Mediapipe is not loaded yet",
        )
        self.assertGreaterEqual(time.monotonic() - began, 0.45)
        self.assertIsNone(process.poll())

    def test_failedGraphLoadExits(self):
        """A graph served alone (--task) that fails to load makes the server exit 1, after REST was up."""
        code, _out, err = runFake(
            ["--rest_port", str(freePort()), "--model_name", "m", "--model_path", self.modelDir(),
             "--task", "text_generation"],
            env={"FAKE_OVMS_FAIL_LOAD": "1"},
        )
        self.assertEqual(code, 1, err)
        self.assertIn("Started REST server", err)
        self.assertIn("Failed to validate graph m", err)

    def test_shapeWithTaskExits64(self):
        """
        --shape (or --batch_size, --nireq...) with a graph (--task) parses,
        but the model start refuses it: OVMS's error in the log and exit 64,
        after REST was bound.
        """
        for flag, value in (("--shape", "(1,3)"), ("--batch_size", "2")):
            code, _out, err = runFake(
                ["--rest_port", str(freePort()), "--model_name", "m", "--model_path", self.modelDir(),
                 "--task", "embeddings", flag, value]
            )
            self.assertEqual(code, 64, err)
            self.assertIn("Started REST server", err)
            self.assertIn(
                f"Starting mediapipe graph with unsupported model settings: {flag[2:]}, "
                "The settings should be set in subconfig.json file.",
                err,
            )

    def test_ownGraphRefusesShapeAndDevice(self):
        """A model directory with its own graph.pbtxt refuses --shape and --target_device alike (exit 64)."""
        path = self.modelDir(graph="EmbeddingsCalculatorOV")
        code, _out, err = runFake(
            ["--rest_port", str(freePort()), "--model_name", "m", "--model_path", path,
             "--shape", "(1,3)", "--target_device", "CPU"]
        )
        self.assertEqual(code, 64, err)
        self.assertIn("unsupported model settings: shape, target_device, ", err)

    def test_shapeOnClassicModelAccepted(self):
        """A classic model takes --shape: it loads and its metadata shows the shape."""
        _process, port = self.start(
            ["--model_name", "m", "--model_path", self.modelDir("classic"), "--shape", "(1,3)"]
        )
        self.assertEqual(call(port, "GET", "/v2/models/m").json()["inputs"][0]["shape"], [1, 3])

    def test_missingModelPathExits(self):
        """A --model_path that does not exist: an error in the log and exit 1, just after the REST bind."""
        port = freePort()
        args = [
            "--rest_port",
            str(port),
            "--model_name",
            "m",
            "--model_path",
            "/nonexistent/model",
            "--task",
            "embeddings",
        ]
        code, _out, err = runFake(args)
        self.assertEqual(code, 1, err)
        self.assertIn("Started REST server", err)
        self.assertIn(
            "The provided base path is invalid or doesn't exists: /nonexistent/model",
            err,
        )

    def test_missingModelPathStays(self):
        """With FAKE_OVMS_BAD_PATH=stay a missing --model_path leaves the server up and the model never available."""
        args = [
            "--model_name",
            "m",
            "--model_path",
            "/nonexistent/model",
            "--task",
            "embeddings",
        ]
        process, port = self.start(
            args, env={"FAKE_OVMS_BAD_PATH": "stay"}, waitReady=False
        )
        self.waitFor(lambda: call(port, "GET", "/v2/health/ready").status == 200)
        self.assertEqual(call(port, "GET", "/v2/models/m/ready").status, 404)
        self.assertIsNone(process.poll())

    def test_portInUseExits(self):
        """If the REST port is taken the fake logs the failure and exits 1."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        args = [
            "--rest_port",
            str(port),
            "--rest_bind_address",
            "127.0.0.1",
            "--model_name",
            "m",
            "--model_path",
            self.modelDir(),
        ]
        code, _out, err = runFake(args)
        self.assertEqual(code, 1)
        self.assertIn("Failed to start REST server", err)

    def test_sigtermExitsPromptly(self):
        """SIGTERM (and SIGINT) stop the fake within a second, exit 0, after logging "Shutting down"."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            process, port = self.graph("embeddings")
            began = time.monotonic()
            process.send_signal(signum)
            self.assertEqual(process.wait(5), 0)
            self.assertLess(time.monotonic() - began, 1.0)
            log = self.stderrOf(process)
            self.assertIn("Shutting down", log)
            self.assertIn("] Shutdown", log)
            with self.assertRaises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()

    def test_sigtermDuringStream(self):
        """SIGTERM in the middle of a slow stream still exits 0 promptly."""
        process, port = self.graph(
            "text_generation", env={"FAKE_OVMS_FRAME_DELAY": "0.5"}
        )
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(client.close)
        body = json.dumps(
            {"model": "m", "prompt": "a b", "stream": True, "max_tokens": 50}
        ).encode()
        client.sendall(
            b"POST /v3/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        self.assertIn(b"200 OK", client.recv(4096))
        began = time.monotonic()
        process.terminate()
        self.assertEqual(process.wait(5), 0)
        self.assertLess(time.monotonic() - began, 1.0)


class TextGenerationTests(FakeOVMSCase):
    """text_generation graphs: chat and legacy completions, plain and streamed."""

    def test_chatCompletion(self):
        """A non-streamed chat completion has OpenAI's shape, echoes the model and repeats the user's words."""
        _process, port = self.graph("text_generation")
        request = {
            "model": "m",
            "messages": [{"role": "user", "content": "red green blue"}],
            "max_tokens": 4,
        }
        body = call(port, "POST", "/v3/chat/completions", request).json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(body["model"], "m")
        self.assertEqual(
            body["choices"][0]["message"],
            {"content": "red green blue red", "role": "assistant"},
        )
        self.assertEqual(body["choices"][0]["finish_reason"], "length")
        self.assertEqual(
            body["usage"],
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        )
        again = call(port, "POST", "/v1/chat/completions", request).json()
        self.assertEqual(again["choices"], body["choices"])

    def test_chatStream(self):
        """stream:true sends SSE frames (chunked, no-cache) whose deltas add up to the plain reply, then [DONE]."""
        _process, port = self.graph("text_generation")
        request = {
            "model": "m",
            "messages": [{"role": "user", "content": "one two"}],
            "max_tokens": 5,
        }
        plain = call(port, "POST", "/v3/chat/completions", request).json()
        request.update(stream=True, stream_options={"include_usage": True})
        response = call(port, "POST", "/v3/chat/completions", request)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "text/event-stream")
        self.assertEqual(response.headers["cache-control"], "no-cache")
        self.assertEqual(response.headers["transfer-encoding"], "chunked")
        frames = sseFrames(response.body)
        self.assertEqual(frames[-1], "[DONE]")
        chunks = [json.loads(f) for f in frames[:-1]]
        self.assertEqual(len(chunks), 6)
        content = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:5])
        self.assertEqual(content, plain["choices"][0]["message"]["content"])
        self.assertEqual(
            [c["choices"][0]["finish_reason"] for c in chunks[:5]],
            [None] * 4 + ["length"],
        )
        self.assertEqual({c["object"] for c in chunks}, {"chat.completion.chunk"})
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 5)

    def test_completions(self):
        """Legacy /v3/completions answers text_completion, plain and streamed (default 5 tokens, finish "stop")."""
        _process, port = self.graph("text_generation")
        plain = call(
            port, "POST", "/v3/completions", {"model": "m", "prompt": "alpha beta"}
        ).json()
        self.assertEqual(plain["object"], "text_completion")
        self.assertEqual(plain["choices"][0]["text"], "alpha beta alpha beta alpha")
        self.assertEqual(plain["choices"][0]["finish_reason"], "stop")
        response = call(
            port,
            "POST",
            "/v3/completions",
            {"model": "m", "prompt": "alpha beta", "stream": True},
        )
        frames = sseFrames(response.body)
        self.assertEqual(frames[-1], "[DONE]")
        text = "".join(json.loads(f)["choices"][0]["text"] for f in frames[:-1])
        self.assertEqual(text, plain["choices"][0]["text"])

    def test_responsesNotStreamedByDefault(self):
        """/v3/responses answers one JSON response object unless asked to stream; a length limit makes it incomplete."""
        _process, port = self.graph("text_generation")
        response = call(port, "POST", "/v3/responses", {"model": "m", "input": "sun moon"})
        self.assertEqual(response.headers["content-type"], "application/json")
        body = response.json()
        self.assertEqual(
            (body["object"], body["status"], body["model"]), ("response", "completed", "m")
        )
        self.assertTrue(body["id"].startswith("resp-"))
        self.assertEqual(body["output"][0]["id"], "msg-0")
        limited = call(
            port, "POST", "/v3/responses", {"model": "m", "input": "sun moon", "max_output_tokens": 3}
        ).json()
        self.assertEqual(limited["output"][0]["content"][0]["text"], "sun moon sun")
        self.assertEqual(
            (limited["status"], limited["incomplete_details"]), ("incomplete", {"reason": "max_tokens"})
        )

    def test_responsesStreamOnlyOnTrue(self):
        """Only a JSON boolean true streams /v3/responses; a string "true" is a 412."""
        _process, port = self.graph("text_generation")
        self.assertEqual(
            call(port, "POST", "/v3/responses", {"model": "m", "input": "x", "stream": False}).headers[
                "content-type"
            ],
            "application/json",
        )
        self.assertError(
            call(port, "POST", "/v3/responses", {"model": "m", "input": "x", "stream": "true"}),
            412,
            "stream field is not a boolean",
        )

    def test_responsesStreamEvents(self):
        """
        A streamed /v3/responses sends only ``data:`` lines (no ``event:``),
        events in OVMS's order with increasing sequence numbers, then
        ``data: [DONE]``.
        """
        _process, port = self.graph("text_generation")
        response = call(
            port, "POST", "/v3/responses", {"model": "m", "input": "sun moon", "stream": True}
        )
        self.assertEqual(response.headers["content-type"], "text/event-stream")
        self.assertNotIn(b"event:", response.body)
        frames = sseFrames(response.body)
        self.assertEqual(frames[-1], "[DONE]")
        events = [json.loads(f) for f in frames[:-1]]
        self.assertEqual(
            [e["type"] for e in events],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
            ]
            + ["response.output_text.delta"] * 5
            + [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ],
        )
        self.assertEqual([e["sequence_number"] for e in events], list(range(len(events))))
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        self.assertEqual(text, events[-1]["response"]["output"][0]["content"][0]["text"])

    def test_responsesRefusals(self):
        """/v3/responses refuses stream_options, and logprobs when streaming (400)."""
        _process, port = self.graph("text_generation")
        for request in (
            {"model": "m", "input": "x", "stream_options": {"include_usage": True}},
            {"model": "m", "input": "x", "stream": True, "logprobs": True},
        ):
            response = call(port, "POST", "/v3/responses", request)
            self.assertEqual(response.status, 400, request)

    def test_tokenize(self):
        """
        /v3/tokenize (and /v1/tokenize) takes ``text``: one string gives a
        flat id list, several a list of lists; ``max_length`` truncates and
        ``pad_to_max_length`` pads on ``padding_side``.
        """
        _process, port = self.graph("text_generation")
        one = call(port, "POST", "/v3/tokenize", {"model": "m", "text": "a b c"}).json()
        self.assertEqual(len(one["tokens"]), 3)
        self.assertTrue(all(isinstance(t, int) for t in one["tokens"]))
        self.assertEqual(
            call(port, "POST", "/v1/tokenize", {"model": "m", "text": ["a b c"]}).json(), one
        )
        two = call(port, "POST", "/v3/tokenize", {"model": "m", "text": ["a b c", "d"]}).json()
        self.assertEqual([len(t) for t in two["tokens"]], [3, 1])
        cut = call(port, "POST", "/v3/tokenize", {"model": "m", "text": "a b c", "max_length": 2}).json()
        self.assertEqual(cut["tokens"], one["tokens"][:2])
        padded = call(
            port,
            "POST",
            "/v3/tokenize",
            {"model": "m", "text": "a", "max_length": 3, "pad_to_max_length": True, "padding_side": "left"},
        ).json()
        self.assertEqual(padded["tokens"][:2], [0, 0])

    def test_deprecatedV3V1Prefix(self):
        """The old /v3/v1/ prefix still reaches the graph's endpoints."""
        _process, port = self.graph("text_generation")
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        self.assertEqual(call(port, "POST", "/v3/v1/chat/completions", chat).status, 200)

    def test_tokenizeErrors(self):
        """/v3/tokenize without ``text``, or with token ids, is a 400 with OVMS's message."""
        _process, port = self.graph("text_generation")
        for request, message in (
            ({"model": "m", "prompt": "a"}, "text field is required"),
            ({"model": "m", "text": [1, 2]}, "Input should be string or array of strings"),
        ):
            response = call(port, "POST", "/v3/tokenize", request)
            self.assertEqual(response.status, 400)
            self.assertIn(message, response.json()["error"])

    def test_tokenizeOnEmbeddingsAndRerank(self):
        """Embeddings and rerank graphs tokenize any path ending in tokenize; image graphs do not."""
        for task in ("embeddings", "rerank"):
            _process, port = self.graph(task)
            response = call(port, "POST", "/v3/tokenize", {"model": "m", "text": "a b"})
            self.assertEqual((response.status, len(response.json()["tokens"])), (200, 2), task)
        _process, port = self.graph("image_generation")
        self.assertEqual(call(port, "POST", "/v3/tokenize", {"model": "m", "text": "a"}).status, 400)

    def test_generationRequestErrors(self):
        """Bad generation fields are Mediapipe execution failures: 400 with OVMS's message prefix."""
        _process, port = self.graph("text_generation")
        prefix = "Mediapipe execution failed. MP status - INVALID_ARGUMENT"
        for path, request in [
            ("/v3/chat/completions", {"model": "m"}),
            ("/v3/chat/completions", {"model": "m", "messages": [], "max_tokens": 2}),
            ("/v3/completions", {"model": "m", "prompt": "x", "max_tokens": "many"}),
            (
                "/v3/completions",
                {
                    "model": "m",
                    "prompt": "x",
                    "stream_options": {"include_usage": True},
                },
            ),
        ]:
            response = call(port, "POST", path, request)
            self.assertEqual(response.status, 400, request)
            self.assertTrue(response.json()["error"].startswith(prefix), response.body)


class TaskEndpointTests(FakeOVMSCase):
    """The other tasks' endpoints and their response shapes."""

    def test_embeddings(self):
        """/v3/embeddings returns an OpenAI list of 8-float vectors, deterministic, float or base64."""
        _process, port = self.graph("embeddings")
        body = call(
            port, "POST", "/v3/embeddings", {"model": "m", "input": ["a cat", "a dog"]}
        ).json()
        self.assertEqual(body["object"], "list")
        self.assertEqual(body["model"], "m")
        self.assertEqual([d["index"] for d in body["data"]], [0, 1])
        self.assertEqual({d["object"] for d in body["data"]}, {"embedding"})
        self.assertEqual([len(d["embedding"]) for d in body["data"]], [8, 8])
        self.assertNotEqual(body["data"][0]["embedding"], body["data"][1]["embedding"])
        self.assertEqual(body["usage"], {"prompt_tokens": 4, "total_tokens": 4})
        single = call(
            port, "POST", "/v3/embeddings", {"model": "m", "input": "a cat"}
        ).json()
        self.assertEqual(single["data"][0]["embedding"], body["data"][0]["embedding"])
        encoded = call(
            port,
            "POST",
            "/v3/embeddings",
            {"model": "m", "input": "a cat", "encoding_format": "base64"},
        ).json()
        floats = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
        for got, want in zip(floats, single["data"][0]["embedding"]):
            self.assertAlmostEqual(got, want, places=5)

    def test_rerank(self):
        """/v3/rerank returns Cohere-style results sorted by relevance_score, cut to top_n."""
        _process, port = self.graph("rerank")
        request = {
            "model": "m",
            "query": "fast red car",
            "documents": ["blue sky", "a fast red car", "red apples"],
            "top_n": 2,
        }
        body = call(port, "POST", "/v3/rerank", request).json()
        results = body["results"]
        self.assertEqual(len(results), 2)
        self.assertEqual(results[0]["index"], 1)
        self.assertGreaterEqual(
            results[0]["relevance_score"], results[1]["relevance_score"]
        )
        self.assertEqual(set(results[0]), {"index", "relevance_score"})

    def test_transcription(self):
        """A multipart upload reaches /v3/audio/transcriptions byte for byte: the text states its size and SHA-256."""
        _process, port = self.graph("speech2text")
        audio = (
            os.urandom(20000)
            + b"\r\n--fakeOvmsBoundary\r\n\r\n"
            + bytes(range(256)) * 4
        )
        body, contentType = multipart(
            {"model": "m", "language": "en"}, {"file": ("a.wav", audio)}
        )
        response = call(
            port,
            "POST",
            "/v3/audio/transcriptions",
            body,
            {"Content-Type": contentType},
        )
        self.assertEqual(response.status, 200, response.body)
        digest = hashlib.sha256(audio).hexdigest()
        self.assertEqual(
            response.json(),
            {"text": f"fake transcription of {len(audio)} bytes sha256={digest}"},
        )
        body, contentType = multipart(
            {"model": "m", "response_format": "text"}, {"file": ("a.wav", audio)}
        )
        response = call(
            port, "POST", "/v1/audio/translations", body, {"Content-Type": contentType}
        )
        self.assertEqual(response.headers["content-type"], "text/plain")
        self.assertEqual(
            response.body.decode(),
            f"fake translation of {len(audio)} bytes sha256={digest}",
        )

    def test_transcriptionErrors(self):
        """No file part: 400 Mediapipe failure; no model part: routed by URI, hence 404; JSON body: 400."""
        _process, port = self.graph("speech2text")
        body, contentType = multipart({"model": "m"}, {})
        response = call(
            port,
            "POST",
            "/v3/audio/transcriptions",
            body,
            {"Content-Type": contentType},
        )
        self.assertEqual(response.status, 400)
        self.assertTrue(
            response.json()["error"].startswith("Mediapipe execution failed.")
        )
        body, contentType = multipart({}, {"file": ("a.wav", b"RIFF")})
        self.assertError(
            call(
                port,
                "POST",
                "/v3/audio/transcriptions",
                body,
                {"Content-Type": contentType},
            ),
            404,
            "Mediapipe graph definition with requested name is not found",
        )
        self.assertEqual(
            call(port, "POST", "/v3/audio/transcriptions", {"model": "m"}).status, 400
        )

    def test_speech(self):
        """/v3/audio/speech returns a 16 kHz 16-bit mono WAV whose length grows with the input, deterministic."""
        _process, port = self.graph("text2speech")
        response = call(
            port,
            "POST",
            "/v3/audio/speech",
            {"model": "m", "input": "hello", "voice": "a"},
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "audio/wav")
        wav = response.body
        self.assertEqual((wav[:4], wav[8:16]), (b"RIFF", b"WAVEfmt "))
        self.assertEqual(struct.unpack("<I", wav[4:8])[0], len(wav) - 8)
        fmt, channels, rate, byteRate, align, bits = struct.unpack(
            "<HHIIHH", wav[20:36]
        )
        self.assertEqual(
            (fmt, channels, rate, byteRate, align, bits), (1, 1, 16000, 32000, 2, 16)
        )
        self.assertEqual(wav[36:40], b"data")
        self.assertEqual(struct.unpack("<I", wav[40:44])[0], len(wav) - 44)
        self.assertEqual(len(wav) - 44, 5 * 800 * 2)
        longer = call(
            port, "POST", "/v3/audio/speech", {"model": "m", "input": "hello hello"}
        ).body
        self.assertGreater(len(longer), len(wav))
        self.assertEqual(
            call(
                port, "POST", "/v3/audio/speech", {"model": "m", "input": "hello"}
            ).body,
            wav,
        )
        missing = call(port, "POST", "/v3/audio/speech", {"model": "m"})
        self.assertEqual(missing.status, 400)

    def test_imageGeneration(self):
        """/v3/images/generations returns n base64 PNGs of the requested size; a bad size is a 400."""
        _process, port = self.graph("image_generation")
        response = call(
            port,
            "POST",
            "/v3/images/generations",
            {"model": "m", "prompt": "a cat", "n": 2, "size": "32x16"},
        )
        body = response.json()
        self.assertIsInstance(body["created"], int)
        self.assertEqual(len(body["data"]), 2)
        png = base64.b64decode(body["data"][0]["b64_json"])
        self.assertEqual(png[:8], PNG_SIGNATURE)
        self.assertEqual(png[12:16], b"IHDR")
        self.assertEqual(struct.unpack(">II", png[16:24]), (32, 16))
        bad = call(
            port,
            "POST",
            "/v3/images/generations",
            {"model": "m", "prompt": "a cat", "size": "big"},
        )
        self.assertEqual(bad.status, 400)
        self.assertTrue(
            bad.json()["error"].startswith(
                "Mediapipe execution failed. MP status - INVALID_ARGUMENT"
            )
        )

    def edit(self, port: int, fields: dict, files: dict):
        """POST /v3/images/edits as multipart; return the response."""
        body, contentType = multipart(fields, files)
        return call(port, "POST", "/v3/images/edits", body, {"Content-Type": contentType})

    def test_imageEdits(self):
        """
        /v3/images/edits takes multipart with ``prompt`` and one file named
        ``image`` (``mask`` optional; ``size`` or ``width``/``height``) and
        answers base64 PNGs; the mask changes the result.
        """
        _process, port = self.graph("image_generation")
        image = {"image": ("in.png", b"PNGDATA")}
        response = self.edit(port, {"model": "m", "prompt": "a hat", "size": "32x16", "n": "2"}, image)
        self.assertEqual(response.status, 200, response.body)
        data = response.json()["data"]
        self.assertEqual(len(data), 2)
        png = base64.b64decode(data[0]["b64_json"])
        self.assertEqual(struct.unpack(">II", png[16:24]), (32, 16))
        sized = self.edit(port, {"model": "m", "prompt": "a hat", "width": "8", "height": "4"}, image)
        png = base64.b64decode(sized.json()["data"][0]["b64_json"])
        self.assertEqual(struct.unpack(">II", png[16:24]), (8, 4))
        masked = self.edit(
            port, {"model": "m", "prompt": "a hat", "size": "32x16", "n": "2"},
            dict(image, mask=("mask.png", b"MASK")),
        )
        self.assertNotEqual(masked.json()["data"][0], data[0])

    def test_imageEditsRefusals(self):
        """
        /v3/images/edits refuses a JSON body ("Failed to parse multipart
        data"), a missing ``image`` file (only that exact name counts), and
        fields it does not handle ("Unhandled parameter: X"), all 400.
        """
        _process, port = self.graph("image_generation")
        json_ = call(port, "POST", "/v3/images/edits", {"model": "m", "prompt": "x"})
        self.assertEqual(json_.status, 400)
        self.assertIn("Failed to parse multipart data", json_.json()["error"])
        noImage = self.edit(port, {"model": "m", "prompt": "x"}, {"image[]": ("in.png", b"P")})
        self.assertEqual(noImage.status, 400)
        for field in ("background", "quality", "style", "output_format", "whatever"):
            refused = self.edit(port, {"model": "m", "prompt": "x", field: "1"}, {"image": ("in.png", b"P")})
            self.assertEqual(refused.status, 400, field)
            self.assertIn(f"Unhandled parameter: {field}", refused.json()["error"])

    def test_graphTaskFromPbtxt(self):
        """Without --task a model_path holding graph.pbtxt is a graph whose task comes from its calculator."""
        path = self.modelDir(graph="EmbeddingsCalculatorOV")
        _process, port = self.start(
            ["--model_name", "emb", "--model_path", path], name="emb"
        )
        self.assertEqual(
            call(port, "POST", "/v3/embeddings", {"model": "emb", "input": "x"}).status,
            200,
        )
        chat = call(
            port,
            "POST",
            "/v3/chat/completions",
            {"model": "emb", "messages": [{"role": "user", "content": "x"}]},
        )
        self.assertEqual(chat.status, 400)
        self.assertTrue(
            chat.json()["error"].startswith(
                "Mediapipe execution failed. MP status - INVALID_ARGUMENT"
            )
        )

    def test_taskFromConfigJson(self):
        """Without --task, a model_path with a Hugging Face config.json gets the task its architectures imply."""
        path = self.modelDir()
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"architectures": ["XLMRobertaForSequenceClassification"]}, f)
        _process, port = self.start(
            ["--model_name", "r", "--model_path", path], name="r"
        )
        response = call(
            port, "POST", "/v3/rerank", {"model": "r", "query": "q", "documents": ["q"]}
        )
        self.assertEqual(response.status, 200, response.body)

    def test_taskOptionsAccepted(self):
        """A task's own options are accepted in both --opt value and --opt=value forms."""
        extra = [
            "--max_num_seqs",
            "4",
            "--enable_prefix_caching=true",
            "--cache_size",
            "2",
            "--target_device",
            "CPU",
        ]
        _process, port = self.graph("text_generation", extra=extra)
        self.assertEqual(call(port, "GET", "/v2/models/m/ready").status, 200)


class ClassicModelTests(FakeOVMSCase):
    """Classic (IR) models: KServe /v2 only."""

    def test_metadataReadyInfer(self):
        """Metadata uses --shape, ready is 200 empty, infer returns 10 deterministic floats and echoes the id."""
        path = self.modelDir("classic")
        _process, port = self.start(
            ["--model_name", "resnet", "--model_path", path, "--shape", "(1,4)"],
            name="resnet",
        )
        metadata = call(port, "GET", "/v2/models/resnet").json()
        self.assertEqual(
            metadata,
            {
                "name": "resnet",
                "versions": ["1"],
                "platform": "OpenVINO",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 10]}],
            },
        )
        self.assertEqual(
            call(port, "GET", "/v2/models/resnet/versions/1").json(), metadata
        )
        self.assertEqual(
            call(port, "GET", "/v2/models/resnet/versions/1/ready").body, b""
        )
        self.assertError(
            call(port, "GET", "/v2/models/resnet/versions/2/ready"),
            404,
            "Model with requested version is not found",
        )
        request = {
            "id": "req-7",
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 4],
                    "datatype": "FP32",
                    "data": [1, 2, 3, 4],
                }
            ],
        }
        body = call(port, "POST", "/v2/models/resnet/infer", request).json()
        self.assertEqual(
            (body["model_name"], body["model_version"], body["id"]),
            ("resnet", "1", "req-7"),
        )
        output = body["outputs"][0]
        self.assertEqual(
            (output["name"], output["shape"], output["datatype"]),
            ("output", [1, 10], "FP32"),
        )
        self.assertEqual(len(output["data"]), 10)
        self.assertEqual(
            call(port, "POST", "/v2/models/resnet/infer", request).json()["outputs"],
            body["outputs"],
        )
        request["inputs"][0]["data"] = [4, 3, 2, 1]
        self.assertNotEqual(
            call(port, "POST", "/v2/models/resnet/infer", request).json()["outputs"],
            body["outputs"],
        )
        self.assertEqual(
            call(port, "GET", "/v2").json(),
            {"name": "OpenVINO Model Server", "version": "2026.3.0"},
        )

    def test_inferErrors(self):
        """Infer refuses bad bodies with OVMS's codes: 412 not JSON, 400 no inputs or wrong shape, 404 unknown name."""
        _process, port = self.start(
            [
                "--model_name",
                "c",
                "--model_path",
                self.modelDir("classic"),
                "--shape",
                "[1,2]",
            ],
            name="c",
        )
        self.assertError(
            call(
                port,
                "POST",
                "/v2/models/c/infer",
                b"{nope",
                {"Content-Type": "application/json"},
            ),
            412,
            "The file is not valid json",
        )
        self.assertError(
            call(port, "POST", "/v2/models/c/infer", {"id": "x"}),
            400,
            "Invalid JSON structure, missing inputs",
        )
        wrong = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 3],
                    "datatype": "FP32",
                    "data": [1, 2, 3],
                }
            ]
        }
        response = call(port, "POST", "/v2/models/c/infer", wrong)
        self.assertEqual(response.status, 400)
        self.assertTrue(response.json()["error"].startswith("Invalid input shape"))
        self.assertError(
            call(port, "POST", "/v2/models/nope/infer", wrong),
            404,
            "Model with requested name is not found",
        )
        self.assertError(
            call(port, "POST", "/v3/chat/completions", {"model": "c", "messages": []}),
            404,
            "Mediapipe graph definition with requested name is not found",
        )
        self.assertEqual(call(port, "GET", "/v3/models").json()["data"], [])

    def test_classicNeedsVersionDirectoryAndModelFile(self):
        """A classic model needs a numeric version directory holding a model file, else it never turns ready."""
        bare = self.modelDir()
        _process, port = self.start(
            ["--model_name", "c", "--model_path", bare], waitReady=False
        )
        self.waitFor(lambda: call(port, "GET", "/v2/health/ready").status == 200)
        self.assertError(
            call(port, "GET", "/v2/models/c/ready"),
            404,
            "Model with requested version is not found",
        )
        empty = self.modelDir()
        os.makedirs(os.path.join(empty, "1"))
        _process, port = self.start(
            ["--model_name", "c", "--model_path", empty], waitReady=False
        )
        self.waitFor(lambda: call(port, "GET", "/v2/health/ready").status == 200)
        self.assertError(
            call(port, "GET", "/v2/models/c/ready"),
            404,
            "Model with requested version is not loaded yet",
        )
        self.assertIn(
            '"error_code": "UNKNOWN"', call(port, "GET", "/v1/config").body.decode()
        )

    def test_configFile(self):
        """--config_path serves model_config_list entries (classic or graph dirs) and mediapipe_config_list graphs."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        classic = os.path.join(root, "resnet", "1")
        os.makedirs(classic)
        with open(os.path.join(classic, "model.xml"), "w") as f:
            f.write("<net/>")
        for name, calculator in (
            ("llm", "HttpLLMCalculator"),
            ("emb", "EmbeddingsCalculatorOV"),
        ):
            os.makedirs(os.path.join(root, name))
            with open(os.path.join(root, name, "graph.pbtxt"), "w") as f:
                f.write(f'node {{ calculator: "{calculator}" }}\n')
        config = {
            "model_config_list": [
                {"config": {"name": "resnet", "base_path": "resnet"}},
                {"config": {"name": "llm", "base_path": "llm"}},
            ],
            "mediapipe_config_list": [{"name": "emb", "base_path": "emb"}],
        }
        configPath = os.path.join(root, "config.json")
        with open(configPath, "w") as f:
            json.dump(config, f)
        _process, port = self.start(["--config_path", configPath], name="resnet")
        self.waitFor(lambda: call(port, "GET", "/v2/health/ready").status == 200)
        self.assertEqual(
            sorted(m["id"] for m in call(port, "GET", "/v3/models").json()["data"]),
            ["emb", "llm"],
        )
        status = call(port, "GET", "/v1/config").body.decode()
        self.assertEqual(
            re.findall(r'^"(\w+)" : $', status, re.MULTILINE), ["emb", "llm", "resnet"]
        )
        self.assertEqual(
            call(port, "POST", "/v3/embeddings", {"model": "emb", "input": "x"}).status,
            200,
        )
        self.assertEqual(
            call(
                port, "POST", "/v3/completions", {"model": "llm", "prompt": "x"}
            ).status,
            200,
        )
        self.assertEqual(call(port, "POST", "/v1/config/reload").status, 200)


class ErrorShapeTests(FakeOVMSCase):
    """OVMS's error statuses and bodies on the REST API."""

    def test_v3RequestErrors(self):
        """412 for bad JSON, non-object, missing or non-string model and non-bool stream; 404 unknown model."""
        _process, port = self.graph("text_generation")
        json_ = {"Content-Type": "application/json"}
        self.assertError(
            call(port, "POST", "/v3/chat/completions", b"{bad", json_),
            412,
            "Cannot parse JSON body",
        )
        self.assertError(
            call(port, "POST", "/v3/chat/completions", [1]),
            412,
            "JSON body must be an object",
        )
        self.assertError(
            call(port, "POST", "/v3/chat/completions", {"messages": []}),
            412,
            "model field is missing in JSON body",
        )
        self.assertError(
            call(port, "POST", "/v3/chat/completions", {"model": 5}),
            412,
            "model field is not a string",
        )
        self.assertError(
            call(port, "POST", "/v3/chat/completions", {"model": "m", "stream": "yes"}),
            412,
            "stream field is not a boolean",
        )
        self.assertError(
            call(port, "POST", "/v3/completions", {"model": "nope", "prompt": "x"}),
            404,
            "Mediapipe graph definition with requested name is not found",
        )

    def test_jsonNeedsContentType(self):
        """Without Content-Type: application/json the body is not read and the graph is chosen by URI: 404."""
        _process, port = self.graph("text_generation")
        body = json.dumps({"model": "m", "prompt": "x"}).encode()
        self.assertError(
            call(port, "POST", "/v3/completions", body, {"Content-Type": "text/plain"}),
            404,
            "Mediapipe graph definition with requested name is not found",
        )

    def test_wrongEndpointForTask(self):
        """An endpoint the graph's task does not serve fails inside the graph: 400 Mediapipe execution failed."""
        _process, port = self.graph("text_generation")
        response = call(port, "POST", "/v3/embeddings", {"model": "m", "input": "x"})
        self.assertEqual(response.status, 400)
        self.assertTrue(
            response.json()["error"].startswith(
                "Mediapipe execution failed. MP status - INVALID_ARGUMENT: "
            )
        )

    def test_badUrlAndMethod(self):
        """Unknown URLs are 400 "Invalid request URL"; a wrong or unsupported method is 406; /metrics needs the flag."""
        _process, port = self.graph("embeddings")
        self.assertError(call(port, "GET", "/nope"), 400, "Invalid request URL")
        self.assertError(
            call(port, "GET", "/v3/embeddings"), 400, "Invalid request URL"
        )
        self.assertError(
            call(port, "PUT", "/v2/health/live"), 406, "Unsupported method"
        )
        self.assertError(
            call(port, "GET", "/v2/models/m/infer"), 406, "Unsupported method"
        )
        self.assertError(
            call(port, "POST", "/v2/health/ready"), 406, "Unsupported method"
        )
        self.assertError(call(port, "GET", "/metrics"), 400, "Invalid request URL")

    def test_metricsEnabled(self):
        """With --metrics_enable, /metrics answers Prometheus text counting requests."""
        _process, port = self.graph("embeddings", extra=["--metrics_enable"])
        call(port, "POST", "/v3/embeddings", {"model": "m", "input": "x"})
        response = call(port, "GET", "/metrics")
        self.assertEqual(response.status, 200)
        self.assertIn(
            'ovms_requests_success{api="V3",interface="REST",method="Unary",name="m"} 1',
            response.body.decode(),
        )

    def test_apiKeyGuardsV3Only(self):
        """
        With API_KEY set, POSTs under /v3 and its /v1 aliases need
        ``Authorization: Bearer K`` (else 500); GETs of the model lists,
        /v2 and /v1/config do not.
        """
        _process, port = self.graph("embeddings", env={"API_KEY": "sekrit"})
        request = {"model": "m", "input": "x"}
        unauthorized = "Unauthorized request due to invalid or missing api-key"
        self.assertError(
            call(port, "POST", "/v3/embeddings", request), 500, unauthorized
        )
        self.assertError(
            call(
                port,
                "POST",
                "/v1/embeddings",
                request,
                {"Authorization": "Bearer wrong"},
            ),
            500,
            unauthorized,
        )
        self.assertEqual(call(port, "GET", "/v3/models").status, 200)
        self.assertEqual(call(port, "GET", "/v1/models").status, 200)
        self.assertEqual(call(port, "GET", "/v3/models/m").status, 200)
        good = {"Authorization": "Bearer sekrit"}
        self.assertEqual(
            call(port, "POST", "/v3/embeddings", request, good).status, 200
        )
        self.assertEqual(
            call(port, "POST", "/v1/embeddings", request, good).status, 200
        )
        self.assertEqual(call(port, "GET", "/v2/health/ready").status, 200)
        self.assertEqual(call(port, "GET", "/v2/models/m/ready").status, 200)
        self.assertEqual(call(port, "GET", "/v1/config").status, 200)

    def test_apiKeyFileTrimmed(self):
        """Only the first line of --api_key_file counts, with its trailing whitespace trimmed."""
        keyFile = os.path.abspath(self.mktemp())
        with open(keyFile, "w") as f:
            f.write("k1\t \r\nsecond line\n")
        _process, port = self.graph("embeddings", extra=["--api_key_file", keyFile])
        request = {"model": "m", "input": "x"}
        self.assertEqual(
            call(port, "POST", "/v3/embeddings", request, {"Authorization": "Bearer k1"}).status, 200
        )

    def test_apiKeyFileUnreadable(self):
        """An unreadable --api_key_file is a usage error: exit 64 with OVMS's message."""
        code, _out, err = runFake(
            ["--rest_port", str(freePort()), "--model_name", "m", "--model_path", self.modelDir(),
             "--task", "embeddings", "--api_key_file", "/nonexistent/key"]
        )
        self.assertEqual(code, 64)
        self.assertIn("Error reading API key file: Unable to open file", err)

    def test_apiKeyFile(self):
        """--api_key_file's first line is the key and wins over the API_KEY variable."""
        keyFile = os.path.abspath(self.mktemp())
        with open(keyFile, "w") as f:
            f.write("fromfile \n")
        _process, port = self.graph(
            "embeddings", env={"API_KEY": "fromenv"}, extra=["--api_key_file", keyFile]
        )
        request = {"model": "m", "input": "x"}
        self.assertEqual(
            call(
                port,
                "POST",
                "/v3/embeddings",
                request,
                {"Authorization": "Bearer fromenv"},
            ).status,
            500,
        )
        self.assertEqual(
            call(
                port,
                "POST",
                "/v3/embeddings",
                request,
                {"Authorization": "Bearer fromfile"},
            ).status,
            200,
        )

    def test_taskGraphsOutsideKServe(self):
        """FAKE_OVMS_TASK_KSERVE=0: a --task graph is no KServe model (404 by name) but /v3 still serves it."""
        _process, port = self.start(
            [
                "--model_name",
                "m",
                "--model_path",
                self.modelDir(),
                "--task",
                "embeddings",
            ],
            env={"FAKE_OVMS_TASK_KSERVE": "0"},
            waitReady=False,
        )
        self.waitFor(lambda: call(port, "GET", "/v2/health/ready").status == 200)
        self.assertError(
            call(port, "GET", "/v2/models/m/ready"),
            404,
            "Model with requested name is not found",
        )
        self.assertError(
            call(port, "GET", "/v2/models/m"),
            404,
            "Model with requested name is not found",
        )
        self.assertEqual(call(port, "GET", "/v3/models/m").json()["id"], "m")
        self.assertEqual(
            call(port, "POST", "/v3/embeddings", {"model": "m", "input": "x"}).status,
            200,
        )

    def test_missingDeviceFailsLoad(self):
        """A --target_device that this machine lacks (FAKE_OVMS_DEVICES, default CPU) makes the load fail."""
        _process, port = self.start(
            [
                "--model_name",
                "m",
                "--model_path",
                self.modelDir("classic"),
                "--target_device",
                "GPU",
            ],
            waitReady=False,
        )
        self.waitFor(lambda: call(port, "GET", "/v2/health/ready").status == 200)
        self.assertError(
            call(port, "GET", "/v2/models/m/ready"),
            404,
            "Model with requested version is not loaded yet",
        )
        _process, port = self.start(
            [
                "--model_name",
                "m",
                "--model_path",
                self.modelDir("classic"),
                "--target_device",
                "GPU",
            ],
            env={"FAKE_OVMS_DEVICES": "CPU,GPU"},
        )
