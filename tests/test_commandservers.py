"""
Integration tests of C{backend: command}: a real dynllm daemon running real
servers from the command lines its models give: llama-server, C{transformers
serve}, and the tests' own L{tests.anyserver} (a server in a "container"
that only its stop command ends, and a server whose readiness is a log line
only). Clients are the official C{openai} SDK and plain HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile

import openai
import yaml
from twisted.trial.unittest import SynchronousTestCase

from dynllm.runner import portIsFree
from tests import fakeovms
from tests.support import (
    Daemon,
    commandLine,
    environmentOf,
    llamaServer,
    pidAlive,
    tinyHFModels,
    tinyModels,
    transformersServe,
    waitFor,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANYSERVER = os.path.join(ROOT, "tests", "anyserver.py")


def llamaCommand(*extra: str) -> list[str]:
    """
    @return: llama-server's command line with placeholders, as a user would
        write it for C{backend: command} (the key on its command line).
    """
    return [llamaServer(), "-m", "{path}", "--host", "{host}", "--port", "{port}", "--alias", "{name}",
            "--ctx-size", "512", "--api-key", "{api_key}", *extra]


def llamaPreset(name: str, path: str, **overrides) -> dict:
    """
    @return: the model of C{etc/presets/llama-server.yaml} as it is, with
        the tests' llama-server binary, C{name}, C{path} and C{overrides}.
    """
    with open(os.path.join(ROOT, "etc", "presets", "llama-server.yaml"), encoding="utf-8") as f:
        [model] = yaml.safe_load(f)["models"]
    model["command"] = [llamaServer(), *model["command"][1:]]
    model.update(name=name, path=path, vram_mb=400, **overrides)
    return {k: v for k, v in model.items() if v is not None}


def containerModel(name: str, state: str) -> dict:
    """
    @return: a model served by L{tests.anyserver} run like a container:
        C{run} starts the server detached, and only C{stop.command} ends it.
    """
    return {
        "name": name,
        "backend": "command",
        "vram_mb": 100,
        "command": [sys.executable, ANYSERVER, "run", state, "{name}", "--", "serve", "--host", "{host}",
                    "--port", "{port}", "--name", "{name}"],
        "stop": {"command": [sys.executable, ANYSERVER, "stop", state, "{name}"], "timeout": 10},
    }


def serverPid(state: str, name: str) -> int | None:
    """
    @return: the pid of the containerised server C{name}, or C{None}.
    """
    try:
        with open(os.path.join(state, name + ".pid")) as f:
            return int(f.read())
    except OSError:
        return None


class LlamaServerByCommandTests(SynchronousTestCase):
    """
    llama-server run through C{backend: command} from the shipped preset
    (C{etc/presets/llama-server.yaml}): chat, streaming, a native route and
    embeddings with the official SDK, with the run's key in its
    environment.
    """

    def setUp(self):
        models = tinyModels()
        self.daemon = Daemon({
            "total_vram_mb": 1000,
            "enabled_backends": ["command"],
            "models": [
                llamaPreset("cmd-chat", models["tiny-llama.gguf"]),
                llamaPreset("cmd-embed", models["tiny-embed.gguf"], model_type="embedding",
                            extra_args=["--embedding"], endpoints=None),
            ],
        }).start()
        self.addCleanup(self.stopDaemon)
        self.client = openai.OpenAI(base_url=self.daemon.url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(self.client.close)

    def stopDaemon(self):
        pids = [m["pid"] for m in self.daemon.models().values() if m["pid"]]
        self.daemon.stop()
        self.assertEqual([p for p in pids if pidAlive(p)], [], "servers outlived the daemon")

    def test_chat(self):
        """
        A chat completion through the command backend answers under the
        model's name; the server got its port and host through the
        placeholders, and a fresh key in C{LLAMA_API_KEY} (from the
        preset's C{env}), not on its command line.
        """
        answer = self.client.chat.completions.create(
            model="cmd-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        self.assertEqual(answer.model, "cmd-chat")
        self.assertEqual(answer.object, "chat.completion")
        model = self.daemon.models()["cmd-chat"]
        argv = commandLine(model["pid"])
        self.assertEqual(argv[argv.index("--port") + 1], str(model["port"]))
        self.assertEqual(argv[argv.index("--host") + 1], "127.0.0.1")
        key = environmentOf(model["pid"])["LLAMA_API_KEY"]
        self.assertEqual(len(key), 43)
        self.assertNotIn(key, argv)

    def test_nativeRoute(self):
        """
        A llama.cpp route that the preset's C{endpoints} lists
        (C{/completion}) is served; one it does not list
        (C{/embedding}) is not.
        """
        status, _, body = self.daemon.post("/completion", {"model": "cmd-chat", "prompt": "a", "n_predict": 2})
        self.assertEqual(status, 200, body)
        self.assertIn("content", json.loads(body))
        status, _, _ = self.daemon.post("/embedding", {"model": "cmd-chat", "content": "a"})
        self.assertNotEqual(status, 200)

    def test_stream(self):
        """
        A streamed chat completion arrives in chunks, under the model's
        name, and ends.
        """
        stream = self.client.chat.completions.create(
            model="cmd-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        chunks = list(stream)
        self.assertGreater(len(chunks), 1)
        self.assertEqual({c.model for c in chunks}, {"cmd-chat"})
        self.assertTrue(any(c.choices and c.choices[0].finish_reason for c in chunks))

    def test_embeddings(self):
        """
        Embeddings through the command backend (C{extra_args} after the
        command) have the model's dimension.
        """
        answer = self.client.embeddings.create(model="cmd-embed", input=["one", "two"])
        self.assertEqual(len(answer.data), 2)
        self.assertGreater(len(answer.data[0].embedding), 0)
        self.assertEqual(answer.model, "cmd-embed")


class TransformersByCommandTests(SynchronousTestCase):
    """
    C{transformers serve} run through C{backend: command} from the shipped
    preset (C{etc/presets/transformers-serve.yaml}), knowing the model by
    its path (C{upstream_model: path}).
    """

    def test_chatRenamed(self):
        """
        A chat completion, plain and streamed, reaches C{transformers serve}
        under the model's path, and the client sees only the model's name.
        """
        path = tinyHFModels()["llm"]
        with open(os.path.join(ROOT, "etc", "presets", "transformers-serve.yaml"), encoding="utf-8") as f:
            [model] = yaml.safe_load(f)["models"]
        model["command"] = [transformersServe(), *model["command"][1:]]
        model["command"][model["command"].index("--device") + 1] = "cpu"
        model["command"][model["command"].index("--dtype") + 1] = "float32"
        model.update(name="cmd-hf", path=path, vram_mb=300)
        daemon = Daemon({
            "total_vram_mb": 1000,
            "enabled_backends": ["command"],
            "load_timeout_seconds": 120,
            "models": [model],
        }).start()
        self.addCleanup(daemon.stop)
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(client.close)
        answer = client.chat.completions.create(
            model="cmd-hf", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        self.assertEqual(answer.model, "cmd-hf")
        chunks = list(client.chat.completions.create(
            model="cmd-hf", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        ))
        self.assertTrue(chunks)
        self.assertEqual({c.model for c in chunks}, {"cmd-hf"})
        self.assertNotIn(path, daemon.get("/v1/models")[2].decode())


class OVMSByCommandTests(SynchronousTestCase):
    """
    OpenVINO Model Server run through C{backend: command} from the shipped
    preset (C{etc/presets/ovms.yaml}), against the OVMS fake.
    """

    def test_chat(self):
        """
        Chat, plain and streamed, reaches the fake's C{/v3} routes (the
        preset's C{endpoints}), with the run's key in C{API_KEY} (the fake,
        like OVMS, refuses POSTs without it), after its readiness path with
        the model's name in it has answered 200.
        """
        directory = tempfile.mkdtemp(prefix="dynllm-ovms-")
        path = os.path.join(directory, "models", "ov-chat")
        os.makedirs(path)
        with open(os.path.join(ROOT, "etc", "presets", "ovms.yaml"), encoding="utf-8") as f:
            [model] = yaml.safe_load(f)["models"]
        model["command"] = [fakeovms.launcher(directory), *model["command"][1:]]
        model.update(name="ov-chat", path=path, vram_mb=100)
        daemon = Daemon({"total_vram_mb": 1000, "enabled_backends": ["command"], "models": [model]},
                        directory=directory).start()
        self.addCleanup(daemon.stop)
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(client.close)
        answer = client.chat.completions.create(model="ov-chat", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(answer.model, "ov-chat")
        chunks = list(client.chat.completions.create(
            model="ov-chat", messages=[{"role": "user", "content": "hi"}], stream=True
        ))
        self.assertTrue(chunks)
        pid = daemon.models()["ov-chat"]["pid"]
        self.assertEqual(len(environmentOf(pid)["API_KEY"]), 43)


class SmallServerTests(SynchronousTestCase):
    """
    The tests' own server through C{backend: command}: a container-style
    stop, a readiness seen in the log only, a key, a fixed upstream name.
    """

    def setUp(self):
        self.state = tempfile.mkdtemp(prefix="dynllm-anyserver-")
        self.addCleanup(self.stopLeftovers)

    def stopLeftovers(self):
        for name in os.listdir(self.state):
            if name.endswith(".pid"):
                pid = serverPid(self.state, name[:-4])
                if pid is not None and pidAlive(pid):
                    os.kill(pid, 9)

    def daemon(self, *models: dict) -> Daemon:
        daemon = Daemon({"total_vram_mb": 1000, "enabled_backends": ["command"], "models": list(models)}).start()
        self.addCleanup(daemon.stop)
        return daemon

    def chat(self, daemon: Daemon, model: str):
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
        self.addCleanup(client.close)
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])

    def test_containerStyleStop(self):
        """
        A server that the model's process only starts (detached, as a
        container) serves, and is ended by C{stop.command} when the model
        is unloaded: the process dynllm started gets no signal but exits
        when its server does.
        """
        daemon = self.daemon(containerModel("boxed", self.state))
        self.assertEqual(self.chat(daemon, "boxed").choices[0].message.content, "hello from boxed")
        server = serverPid(self.state, "boxed")
        client = daemon.models()["boxed"]["pid"]
        self.assertIsNotNone(server)
        self.assertNotEqual(server, client)
        self.assertEqual(daemon.post("/admin/models/unload", {"model": "boxed"})[0], 200)
        self.assertFalse(pidAlive(server))
        self.assertFalse(pidAlive(client))
        self.assertEqual(daemon.models()["boxed"]["status"], "unloaded")
        self.assertIn("stop: stopping boxed", daemon.log())

    def test_upstreamPassesThrough(self):
        """
        C{/upstream/MODEL/PATH} reaches a command model's own server, as it
        does llama-server's.
        """
        daemon = self.daemon({
            "name": "plain", "backend": "command", "vram_mb": 100,
            "command": [sys.executable, ANYSERVER, "serve", "--host", "{host}", "--port", "{port}"],
        })
        status, _, body = daemon.get("/upstream/plain/health")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body), {"status": "ok"})

    def test_readyByLogOnly(self):
        """
        A server whose C{/health} never answers 200 is ready once its
        output shows the line C{ready.log} names.
        """
        daemon = self.daemon({
            "name": "logged", "backend": "command", "vram_mb": 100,
            "command": [sys.executable, ANYSERVER, "serve", "--host", "{host}", "--port", "{port}", "--log-ready"],
            "ready": {"log": "ANYSERVER READY", "http": False},
        })
        self.assertEqual(self.chat(daemon, "logged").choices[0].message.content, "hello from anyserver")

    def test_serverOpenToTheNetworkStopped(self):
        """
        A server that does not take C{{host}} and listens on every interface
        (as vLLM does when not told otherwise) is stopped once it answers,
        instead of being served: its load fails saying why, and nothing
        listens on its port after.
        """
        daemon = self.daemon({
            "name": "open", "backend": "command", "vram_mb": 100,
            "command": [sys.executable, ANYSERVER, "serve", "--every-interface", "--port", "{port}"],
        })
        status, _, body = daemon.post("/v1/chat/completions", {"model": "open", "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 502, body)
        message = json.loads(body)["error"]["message"]
        self.assertIn("exited", message)
        self.assertIn("its server listens on 0.0.0.0 port", daemon.log())
        logs = daemon.get("/admin/models/open/logs")[2].decode()
        self.assertIn("open to the network; it must listen on 127.0.0.1 only: give its command {host}", logs)
        model = daemon.models()["open"]
        self.assertEqual(model["status"], "failed")
        self.assertIn("open to the network", model["last_error"])

    def test_keyAndFixedUpstreamName(self):
        """
        A command that takes C{{api_key}} gets a key that dynllm sends as
        Bearer (the server refuses requests without it), and a fixed
        C{upstream_model} is what the server sees, renamed back for the
        client.
        """
        daemon = self.daemon({
            "name": "keyed", "backend": "command", "vram_mb": 100,
            "command": [sys.executable, ANYSERVER, "serve", "--host", "{host}", "--port", "{port}",
                        "--api-key", "{api_key}"],
            "upstream_model": "upstream-name",
        })
        answer = self.chat(daemon, "keyed")
        self.assertEqual(answer.model, "keyed")
        self.assertIn('"POST /v1/chat/completions HTTP/1.1" 200', daemon.log())
        self.assertIn("request for model 'upstream-name'", daemon.log())


    def test_readyPathBehindKey(self) -> None:
        """
        A server whose C{ready.http.path} is behind its key (C{/v1/models},
        as on vLLM) is probed with the key, and so becomes ready.
        """
        daemon = self.daemon({
            "name": "guarded", "backend": "command", "vram_mb": 100,
            "command": [sys.executable, ANYSERVER, "serve", "--host", "{host}", "--port", "{port}",
                        "--api-key", "{api_key}"],
            "ready": {"http": {"path": "/v1/models"}},
        })
        self.assertEqual(self.chat(daemon, "guarded").choices[0].message.content, "hello from anyserver")
        self.assertIn('"GET /v1/models HTTP/1.1" 200', daemon.log())

    def test_keyNeverShown(self) -> None:
        """
        The run's key, on the server's command line, is in neither the
        daemon's log nor C{/admin/models} nor the client's answer.
        """
        daemon = self.daemon({
            "name": "secret", "backend": "command", "vram_mb": 100,
            "command": [sys.executable, ANYSERVER, "serve", "--host", "{host}", "--port", "{port}",
                        "--api-key", "{api_key}"],
        })
        status, _, body = daemon.post("/v1/chat/completions", {"model": "secret", "messages": []})
        self.assertEqual(status, 200, body)
        pid = daemon.models()["secret"]["pid"]
        argv = commandLine(pid)
        key = argv[argv.index("--api-key") + 1]
        self.assertNotIn(key, daemon.log())
        self.assertIn("--api-key <api_key>", daemon.log())
        self.assertNotIn(key.encode(), body)
        self.assertNotIn(key.encode(), daemon.get("/admin/models")[2])
        self.assertNotIn(key.encode(), daemon.get("/admin/models/secret/logs")[2])


    def test_hupRestartsWithNewCommand(self) -> None:
        """
        After SIGHUP with a changed command, a loaded container-style model
        is stopped by its stop command (its old server is gone) and loaded
        again with the new command.
        """
        daemon = self.daemon(containerModel("boxed", self.state))
        self.assertEqual(self.chat(daemon, "boxed").choices[0].message.content, "hello from boxed")
        old = serverPid(self.state, "boxed")
        model = containerModel("boxed", self.state)
        model["command"] = [*model["command"][:-1], "{name}-v2"]
        daemon.config = dict(daemon.config, models=[model])
        with open(daemon.configPath, "w") as f:
            yaml.safe_dump(daemon.config, f)
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        self.assertTrue(waitFor(lambda: "configuration reloaded" in daemon.log(), timeout=10), daemon.log())
        self.assertTrue(waitFor(lambda: old is not None and not pidAlive(old), timeout=15))
        self.assertTrue(waitFor(lambda: daemon.models()["boxed"]["status"] == "loaded", timeout=15))
        self.assertEqual(self.chat(daemon, "boxed").choices[0].message.content, "hello from boxed-v2")
        self.assertNotEqual(serverPid(self.state, "boxed"), old)


class CrashRecoveryByCommandTests(SynchronousTestCase):
    """
    C{kill -9} of the daemon with command models loaded, then a restart:
    nothing is left, not even a server in a "container".
    """

    def test_kill9ThenRestart(self):
        """
        After SIGKILL of the daemon, the kernel ends the processes it
        started, but a container-style server outlives them; the next
        daemon runs that model's stop command (with the port recorded) at
        start-up, so that no server is left and every port is free.
        """
        state = tempfile.mkdtemp(prefix="dynllm-anyserver-")
        models = tinyModels()
        first = Daemon({
            "total_vram_mb": 1000,
            "enabled_backends": ["command"],
            "models": [
                {"name": "cmd-chat", "path": models["tiny-llama.gguf"], "backend": "command", "vram_mb": 400,
                 "command": llamaCommand()},
                containerModel("boxed", state),
            ],
        }).start()
        for name in ("cmd-chat", "boxed"):
            self.assertEqual(first.post("/admin/models/load", {"model": name})[0], 200)
        loaded = {n: (m["pid"], m["port"]) for n, m in first.models().items()}
        server = serverPid(state, "boxed")
        self.assertIsNotNone(server)
        first.kill9()
        for pid, _ in loaded.values():
            self.assertTrue(waitFor(lambda: not pidAlive(pid), timeout=5), f"pid {pid} survived its daemon")
        self.assertTrue(pidAlive(server), "the container-style server should outlive the daemon's processes")

        second = Daemon(first.config, directory=first.directory)
        second.port = first.port
        second.url = first.url
        second.start()
        self.addCleanup(second.stop)
        self.assertFalse(pidAlive(server), "the stop command did not end the leftover server")
        self.assertIn("running its stop command for the server a previous run left", second.log())
        models_ = second.models()
        self.assertTrue(all(m["status"] == "unloaded" and m["pid"] is None for m in models_.values()))
        for _, port in loaded.values():
            self.assertTrue(portIsFree(port), f"port {port} is still taken")

    def test_kill9ThenRestartWithoutTheModel(self):
        """
        After SIGKILL of the daemon, a next daemon whose configuration no
        longer has the container-style model (or has changed its stop
        command) still runs the stop command recorded for the run, so that
        its server is not left behind.
        """
        state = tempfile.mkdtemp(prefix="dynllm-anyserver-")
        first = Daemon({
            "total_vram_mb": 1000, "enabled_backends": ["command"], "models": [containerModel("boxed", state)],
        }).start()
        self.addCleanup(first.stop)
        self.assertEqual(first.post("/admin/models/load", {"model": "boxed"})[0], 200)
        server = serverPid(state, "boxed")
        self.assertIsNotNone(server)
        self.addCleanup(lambda: pidAlive(server) and os.kill(server, 9))
        first.kill9()
        self.assertTrue(pidAlive(server))
        other = {"name": "other", "backend": "command", "vram_mb": 100,
                 "command": [sys.executable, ANYSERVER, "serve", "--host", "{host}", "--port", "{port}"]}
        second = Daemon(dict(first.config, models=[other]), directory=first.directory)
        second.port, second.url = first.port, first.url
        second.start()
        self.addCleanup(second.stop)
        self.assertFalse(pidAlive(server), "the recorded stop command did not end the leftover server")
        self.assertIn("stop: stopping boxed", second.log())
