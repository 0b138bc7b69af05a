# -*- test-case-name: tests.test_config -*-
"""
The configuration file: YAML read into frozen attrs classes and validated.

Everything that can be wrong with a file is found here, before the daemon
binds a port or starts a backend: L{loadConfig} raises one L{ConfigError}
listing every problem found, each naming the key, the model and what is wrong,
so that a file is mended in one round rather than one problem per start.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
from typing import Any, Callable, Mapping, cast

import yaml
from attrs import Attribute, evolve, field, fields, frozen

from dynllm.endpoints import BACKEND_KINDS, KSERVE_TYPES, MODEL_TYPES, endpointOf, modelTypesOf
from dynllm.owned import OWNED
from dynllm.placeholders import LISTEN_ALL_IN, PlaceholderError, addressProblems, expand, placeholdersIn

#: Which backend kind serves which model types: read from the endpoint
#: table, the one place that says which endpoint serves what.
BACKEND_MODEL_TYPES = {kind: modelTypesOf(kind) for kind in BACKEND_KINDS}

#: Model fields that only make sense for one backend kind.
BACKEND_ONLY_FIELDS = {
    "n_gpu_layers": "llamacpp",
    "context_size": "llamacpp",
    "target_device": "openvino",
    "ovms_shape": "openvino",
    "device": "transformers",
    "dtype": "transformers",
    "quantization": "transformers",
    "trust_remote_code": "transformers",
    "compile_model": "transformers",
    "continuous_batching": "transformers",
    "attn_implementation": "transformers",
    "model_timeout": "transformers",
    "revision": "transformers",
    "command": "command",
    "ready": "command",
    "endpoints": "command",
    "upstream_model": "command",
}

#: The backend kind whose server is any command the model gives.
COMMAND = "command"

#: The signals C{stop.signal} may name.
STOP_SIGNALS = ("TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "KILL")

EVICTION_POLICIES = ("lifo", "lru")

#: The file that makes a model directory a MediaPipe graph of its own, which
#: OVMS then serves as it is (made by OVMS's export script or C{--pull}).
OVMS_GRAPH_FILE = "graph.pbtxt"


def hasOwnGraph(path: str) -> bool:
    """
    @param path: An OpenVINO model's directory.
    @return: whether it holds its own L{OVMS_GRAPH_FILE}, which OVMS then
        serves as it is (no C{--task}, no C{--target_device}).
    """
    return os.path.isfile(os.path.join(path, OVMS_GRAPH_FILE))


class ConfigError(Exception):
    """
    The configuration is unusable: every problem found, each on one line
    that says where and why.

    C{str(error)} is the one problem, or a first line counting them and then
    one indented line each; either way prefixed with the file when there is
    one (C{"dynllm.yaml: unknown key 'totl_vram_mb' ..."}).

    @ivar problems: The problems, in the order found (the file's order, then
        the checks across models), without the file name; at least one.
    @ivar source: The file they were found in, or C{None}.
    """

    def __init__(self, *problems: str, source: str | None = None) -> None:
        """
        @param problems: One line each (a YAML syntax error may span
            several); at least one.
        @param source: The file, if any.
        """
        super().__init__(*problems)
        self.problems: tuple[str, ...] = problems
        self.source = source

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return prefix + self.problems[0]
        lines = [f"{prefix}{len(self.problems)} problems:"]
        lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)


# Value checkers: each takes the raw YAML value and the place it came from,
# and returns the value to store or raises ConfigError.


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, not {value!r}")
    return value


def _optionalStr(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    return value


def _nonNegativeInt(value: Any, where: str) -> int:
    number = _int(value, where)
    if number < 0:
        raise ConfigError(f"{where} must be 0 or more, not {value!r}")
    return number


def _port(value: Any, where: str) -> int:
    port = _int(value, where)
    if not 0 < port < 65536:
        raise ConfigError(f"{where} must be a port number between 1 and 65535, not {value!r}")
    return port


def _positiveNumber(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{where} must be a number greater than 0, not {value!r}")
    return float(value)


def _nonNegativeNumber(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where} must be a number of 0 or more, not {value!r}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    return value


def _timeout(value: Any, where: str) -> float | None:
    """
    An idle timeout in seconds: C{-1}, C{inf} or C{.inf} mean never.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "never"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number of seconds, -1 or inf, not {value!r}")
    if value == -1 or value == math.inf:
        return math.inf
    if value < 0:
        raise ConfigError(f"{where} must be 0 or more seconds (or -1/inf for never), not {value!r}")
    return float(value)


def _optionalTimeout(value: Any, where: str) -> float | None:
    """
    A timeout in seconds where C{-1} (or C{inf}) turns it off: off is
    C{math.inf}; C{None} (only when the key is absent) defers elsewhere.
    """
    seconds = _timeout(value, where)
    if seconds == 0:
        raise ConfigError(f"{where} must be more than 0 seconds (or -1 for never), not {value!r}")
    return seconds


def _keyList(value: Any, where: str) -> tuple[str, ...]:
    """
    Bearer keys: each a string with no white space at its ends and at least
    one character, since an empty key would let a request without one in.
    """
    keys = _strList(value, where)
    for index, key in enumerate(keys):
        if not key.strip():
            raise ConfigError(f"{where}[{index}] is empty or white space; a key must have characters")
        if key != key.strip():
            raise ConfigError(f"{where}[{index}] begins or ends with white space, which an Authorization header cannot carry")
    return keys


def _optionalPositiveInt(value: Any, where: str) -> int | None:
    if value is None:
        return None
    number = _int(value, where)
    if number < 1:
        raise ConfigError(f"{where} must be 1 or more, not {value!r}")
    return number


def _strList(value: Any, where: str, nonEmpty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and (v or not nonEmpty) for v in value):
        kind = "non-empty strings" if nonEmpty else "strings"
        raise ConfigError(f"{where} must be a list of {kind}, not {value!r}")
    return tuple(value)


#: An origin as browsers send it (RFC 6454 6.1): scheme, host (an IPv6
#: address in brackets) and an optional port, no path.
_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^\s/?#@:*\[\]]+)(?::([0-9]{1,5}))?\Z", re.IGNORECASE)

#: Ports browsers leave out of an origin.
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _origins(value: Any, where: str) -> tuple[str, ...]:
    """
    Origins allowed to call the API from a browser: C{*}, or each as
    C{scheme://host[:port]}. They are lower-cased and a default port is
    left out, as browsers serialize an C{Origin} header.
    """
    origins = []
    for origin in _strList(value, where):
        if origin == "*":
            origins.append(origin)
            continue
        match = _ORIGIN.match(origin)
        if match is None or (match.group(3) is not None and not 0 < int(match.group(3)) < 65536):
            raise ConfigError(
                f"{where}: {origin!r} is not an origin; write scheme://host[:port]"
                f" (such as 'http://localhost:3000', no path or trailing slash), or '*' for any"
            )
        scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3)
        if port is None or _DEFAULT_PORTS.get(scheme) == port.lstrip("0"):
            origins.append(f"{scheme}://{host}")
        else:
            origins.append(f"{scheme}://{host}:{int(port)}")
    return tuple(origins)


def _argList(value: Any, where: str) -> tuple[str, ...]:
    """
    Extra command-line arguments: numbers are accepted and turned into text.
    """
    if not isinstance(value, list) or not all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"{where} must be a list of strings, not {value!r}")
    return tuple(str(v) for v in value)


def _envMapping(value: Any, where: str) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of variable names to values, not {value!r}")
    env = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name or "=" in name:
            raise ConfigError(f"{where} has an invalid variable name {name!r}")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ConfigError(f"{where}.{name} must be a string or a number, not {v!r}")
        env[name] = str(v)
    return env


@frozen
class ReadyConfig:
    """
    How a command backend's readiness is seen (C{ready}); when both are
    given, both must be seen.

    @ivar http_path: The path polled with C{GET} until it answers
        L{http_status}, or C{None} for no HTTP probe; it may hold
        placeholders (C{/v2/models/{name}/ready}).
    @ivar http_status: The status that means ready.
    @ivar log: A regular expression (Python's C{re}) that a line of the
        server's output must match, or C{None}.
    """

    http_path: str | None = "/health"
    http_status: int = 200
    log: str | None = None


@frozen
class StopConfig:
    """
    How a model's server is stopped (C{stop}).

    @ivar signal: The signal sent to its process group (without C{SIG}).
    @ivar timeout: Seconds from the signal (or the stop command) to KILL of
        the process group; C{None} defers to the daemon's own (5 s).
    @ivar command: A command to run instead of sending L{signal}, with
        placeholders (L{dynllm.placeholders}), such as C{docker stop
        {name}} for a server in a container; empty for none.
    """

    signal: str = "TERM"
    timeout: float | None = None
    command: tuple[str, ...] = ()


def _placeholderProblems(args: tuple[str, ...], where: str, forbidden: tuple[str, ...] = ()) -> list[str]:
    """
    @return: a problem for each argument of C{args} with an unknown
        placeholder, a lone brace, or a placeholder of C{forbidden}.
    """
    problems = []
    for index, arg in enumerate(args):
        try:
            used = placeholdersIn(arg)
        except PlaceholderError as e:
            problems.append(f"{where}[{index}]: {e}")
            continue
        for name in used:
            if name in forbidden:
                problems.append(
                    f"{where}[{index}]: {{{name}}} cannot be used here (a stop command also runs after a"
                    " crash of the daemon, when the run's key is gone)"
                )
    return problems


def _uses(template: str, placeholder: str) -> bool:
    """
    @return: whether C{template} uses C{placeholder} (C{False} for a
        template that is not valid, which is reported on its own).
    """
    try:
        return placeholder in placeholdersIn(template)
    except PlaceholderError:
        return False


def _command(value: Any, where: str) -> tuple[str, ...]:
    """
    A command line with placeholders: a non-empty list of strings (numbers
    are turned into text), each a valid template.
    """
    args = _argList(value, where)
    if not args or not args[0]:
        raise ConfigError(f"{where} must be a non-empty list of strings, the program first, not {value!r}")
    problems = _placeholderProblems(args, where)
    if problems:
        raise ConfigError(*problems)
    return args


def _mappingOf(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping (keys: {', '.join(keys)}), not {value!r}")
    unknown = [_unknownKey(f"{where}.{k}", k, dict.fromkeys(keys)) for k in value if k not in keys]
    if unknown:
        raise ConfigError(*unknown)
    return value


def _ready(value: Any, where: str) -> ReadyConfig:
    """
    C{ready}: C{http: {path, status}} (C{http: true} for C{GET /health} ==
    200), C{log: REGEX}, or both.
    """
    raw = _mappingOf(value, where, ("http", "log"))
    problems: list[str] = []
    path: str | None = None
    status = 200
    http = raw.get("http")
    if http is True or (http is None and "log" not in raw):
        path = "/health"
    elif http is not None and http is not False:
        try:
            spec = _mappingOf(http, f"{where}.http", ("path", "status"))
        except ConfigError as e:
            problems.extend(e.problems)
            spec = {}
        path = spec.get("path", "/health")
        if not isinstance(path, str) or not path.startswith("/"):
            problems.append(f"{where}.http.path must be a path starting with '/', not {path!r}")
        else:
            problems.extend(_placeholderProblems((path,), f"{where}.http.path", ("api_key",)))
        raw_status = spec.get("status", 200)
        if isinstance(raw_status, bool) or not isinstance(raw_status, int) or not 100 <= raw_status <= 599:
            problems.append(f"{where}.http.status must be an HTTP status (100 to 599), not {raw_status!r}")
        else:
            status = raw_status
    log = raw.get("log")
    if log is not None:
        if not isinstance(log, str) or not log:
            problems.append(f"{where}.log must be a regular expression, not {log!r}")
            log = None
        else:
            try:
                re.compile(log)
            except re.error as e:
                problems.append(f"{where}.log is not a valid regular expression: {e}")
    if path is None and log is None and not problems:
        problems.append(f"{where} must give http, log or both (http: false leaves only log)")
    if problems:
        raise ConfigError(*problems)
    return ReadyConfig(http_path=path, http_status=status, log=log)


def _stop(value: Any, where: str) -> StopConfig:
    """
    C{stop}: C{signal} (default TERM) and C{timeout} before KILL, or a
    C{command} run instead of the signal (with its C{timeout}).
    """
    raw = _mappingOf(value, where, ("signal", "timeout", "command"))
    problems: list[str] = []
    signal = "TERM"
    if "signal" in raw:
        name = raw["signal"]
        if isinstance(name, str) and name.upper().removeprefix("SIG") in STOP_SIGNALS:
            signal = name.upper().removeprefix("SIG")
        else:
            problems.append(f"{where}.signal must be one of {', '.join(STOP_SIGNALS)}, not {name!r}")
    timeout = None
    if "timeout" in raw:
        try:
            timeout = _positiveNumber(raw["timeout"], f"{where}.timeout")
            if math.isinf(timeout):
                # The KILL after it is what makes a stop certain.
                raise ConfigError(f"{where}.timeout must be a finite number of seconds, not {raw['timeout']!r}")
        except ConfigError as e:
            problems.extend(e.problems)
    command: tuple[str, ...] = ()
    if "command" in raw:
        try:
            command = _argList(raw["command"], f"{where}.command")
            if not command or not command[0]:
                raise ConfigError(f"{where}.command must be a non-empty list of strings, not {raw['command']!r}")
            problems.extend(_placeholderProblems(command, f"{where}.command", ("api_key",)))
        except ConfigError as e:
            problems.extend(e.problems)
        if "signal" in raw:
            problems.append(f"{where}: give signal or command, not both (the command is run instead of the signal)")
    if problems:
        raise ConfigError(*problems)
    return StopConfig(signal=signal, timeout=timeout, command=command)


def _endpoints(value: Any, where: str) -> Mapping[str, str]:
    """
    C{endpoints}: public route -> the path that serves it on the server
    (a list of routes: each at its own path). Each route must be one of the
    endpoint table's (L{dynllm.endpoints}), under any of its spellings; it
    is kept under its first.
    """
    given = value
    if isinstance(value, list):
        value = {route: None for route in value}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where} must be a mapping of dynllm routes to upstream paths, or a list of routes, not {given!r}")
    problems = []
    table: dict[str, str] = {}
    for route, path in value.items():
        endpoint = endpointOf(route) if isinstance(route, str) else None
        if endpoint is None or "{name}" in endpoint.path:
            problems.append(f"{where}: {route!r} is not a route dynllm serves by model (see the endpoint table)")
            continue
        if endpoint.path in table:
            problems.append(f"{where}: {route!r} is {endpoint.path} again (each route once, under one spelling)")
            continue
        if path is None:
            path = endpoint.path
        if not isinstance(path, str) or not path.startswith("/"):
            problems.append(f"{where}.{route} must be an upstream path starting with '/', not {path!r}")
            continue
        if "{" in path or "}" in path:
            problems.append(f"{where}.{route}: an upstream path takes no placeholders, not {path!r}")
            continue
        table[endpoint.path] = path
    if problems:
        raise ConfigError(*problems)
    return table


def _oneOf(*choices: str) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
        return cast(str, value)

    return check


def _optionalOneOf(*choices: str) -> Callable[[Any, str], str | None]:
    check = _oneOf(*choices)
    return lambda value, where: None if value is None else check(value, where)


def _setting(default: Any, check: Callable[[Any, str], Any], **kw: Any) -> Any:
    return field(default=default, metadata={"check": check}, **kw)


def _section(cls: type) -> Any:
    """
    A key holding a mapping of its own, read into attrs class C{cls} by
    L{_build} (so that each of its problems is reported, not only the first).
    """
    return field(default=cls(), metadata={"check": None, "section": cls})


#: The default of a key that must be given.
_REQUIRED = object()


class _Problems:
    """
    The problems found in a configuration so far, in the order found.

    @ivar found: One line each.
    """

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        """
        Record C{problem}.
        """
        self.found.append(problem)

    def check(self, check: Callable[[Any, str], Any], value: Any, where: str) -> tuple[bool, Any]:
        """
        Run a value checker, recording what it refuses.

        @return: whether C{value} passed, and what C{check} made of it.
        """
        try:
            return True, check(value, where)
        except ConfigError as e:
            self.found.extend(e.problems)
            return False, None


@frozen
class _Built:
    """
    What L{_build} made of a YAML mapping.

    @ivar value: The instance. A key that was refused or missing has its
        default, or a stand-in (of its type) when it is required: so
        that the other keys can still be checked. An instance with problems
        never leaves L{parseConfig}.
    @ivar refused: The keys that were refused or missing (C{"port"}; below a
        section, dotted: C{"server.port"}; the section itself when it was
        not a mapping). Checks that read one of them are skipped, so that
        one mistake is reported once.
    """

    value: Any
    refused: frozenset[str]

    def ok(self, key: str) -> bool:
        """
        @param key: A key, dotted below a section (C{"backend.ovms_binary"}).
        @return: whether C{key} and the section holding it were accepted.
        """
        parts = key.split(".")
        return not any(".".join(parts[: i + 1]) in self.refused for i in range(len(parts)))


#: Stand-ins for the required keys, by type, while a model that lacks one is
#: checked further (see L{_Built.value}).
_STAND_INS: Mapping[str, Any] = {"str": "", "int": 0}


def _unknownKey(place: str, key: Any, known: Mapping[str, Any]) -> str:
    """
    @return: the problem of an unknown C{key} at C{place}, with the known
        key it was probably meant to be if one is close, else every known
        key there.
    """
    guess = difflib.get_close_matches(str(key), list(known), n=1)
    if guess:
        return f"unknown key {place!r} (did you mean {guess[0]!r}?)"
    return f"unknown key {place!r} (known keys here: {', '.join(sorted(known))})"


def _build(cls: type, raw: Any, where: str, problems: _Problems, **extra: Any) -> _Built:
    """
    Make an instance of attrs class C{cls} from a YAML mapping, checking every
    key against the class's fields and every value with its field's checker
    (a section, L{_section}, is built the same way), recording every problem
    in C{problems}.

    @param where: The mapping's place in the file (C{"server"},
        C{"models[0] ('m1')"}), or C{""} for the whole file.
    @param extra: Fields that the file does not set.
    """
    known: dict[str, Attribute[Any]] = {a.name: a for a in fields(cls) if "check" in a.metadata}
    required = [name for name, a in known.items() if a.default is _REQUIRED]
    standIns = {name: _STAND_INS[str(known[name].type)] for name in required}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(f"{where or 'the file'} must be a mapping, not {raw!r}")
        return _Built(cls(**standIns, **extra), frozenset(known) | {""})
    kwargs = dict(extra)
    refused: set[str] = set()
    for key, value in raw.items():
        place = f"{where}.{key}" if where else str(key)
        if key not in known:
            problems.add(_unknownKey(place, key, known))
            guess = difflib.get_close_matches(str(key), list(known), n=1)
            if guess and guess[0] not in raw:
                # A mistake is said once: the misspelt key is not also missing.
                refused.add(guess[0])
            continue
        section = known[key].metadata.get("section")
        if section is not None:
            built = _build(section, value, place, problems)
            refused.update(f"{key}.{name}" if name else key for name in built.refused)
            kwargs[key] = built.value
            continue
        accepted, checked = problems.check(known[key].metadata["check"], value, place)
        if accepted:
            kwargs[key] = checked
        else:
            refused.add(key)
    for name in required:
        if name not in kwargs:
            if name not in refused:
                problems.add(f"{where + '.' if where else ''}{name} is required")
                refused.add(name)
            kwargs[name] = standIns[name]
    return _Built(cls(**kwargs), frozenset(refused))


@frozen
class ServerConfig:
    """
    Where the daemon listens.

    @ivar host: The address to bind.
    @ivar port: The TCP port to bind.
    @ivar api_keys: Bearer keys accepted on the OpenAI routes; empty means open.
    @ivar admin_api_keys: Bearer keys accepted on C{/admin}; when empty the
        client keys are accepted there too.
    @ivar cors_origins: Origins whose web pages may call the API (CORS),
        normalized (see L{dynllm.cors.CORSPolicy}); C{*} allows every
        origin; empty (the default) allows none.
    @ivar allowed_hosts: C{Host} header values accepted besides loopback
        addresses and C{localhost} when no keys are set (against DNS
        rebinding); C{*} accepts any.
    @ivar metrics_api_keys: Bearer keys that may read C{/metrics} (and
        nothing else), so that Prometheus needs no admin key.
    @ivar metrics_public: Whether C{/metrics} needs no key at all.
    @ivar request_timeout_seconds: How long a client has to send a request's
        head and body, in seconds, counted from its first byte.
    @ivar max_connections: How many client connections are open at once;
        beyond it new ones are answered 503 and closed. C{None} (the
        default) is half the process's open-file limit, at most 1024.
    """

    host: str = _setting("127.0.0.1", _str)
    port: int = _setting(8000, _port)
    api_keys: tuple[str, ...] = _setting((), _keyList)
    admin_api_keys: tuple[str, ...] = _setting((), _keyList)
    metrics_api_keys: tuple[str, ...] = _setting((), _keyList)
    metrics_public: bool = _setting(False, _bool)
    cors_origins: tuple[str, ...] = _setting((), _origins)
    allowed_hosts: tuple[str, ...] = _setting((), lambda v, w: _strList(v, w, nonEmpty=True))
    request_timeout_seconds: float = _setting(30.0, _positiveNumber)
    max_connections: int | None = _setting(None, _optionalPositiveInt)


@frozen
class BackendSettings:
    """
    How backend programs are found and which ports they may use.
    """

    llamacpp_binary: str = _setting("llama-server", _str)
    ovms_binary: str = _setting("ovms", _str)
    transformers_binary: str = _setting("transformers", _str)
    port_range_start: int = _setting(9100, _port)
    port_range_end: int = _setting(9200, _port)

    #: The key that names each backend kind's program.
    BINARY_KEYS = {
        "llamacpp": "llamacpp_binary",
        "openvino": "ovms_binary",
        "transformers": "transformers_binary",
    }

    def binaryFor(self, kind: str) -> str:
        """
        @return: the configured program name or path for backend C{kind}
            (C{""} for C{command}, whose models give their own).
        """
        key = self.BINARY_KEYS.get(kind)
        if key is None:
            # A command backend's program is the first of its model's command.
            return ""
        binary: str = getattr(self, key)
        return binary


@frozen
class ModelConfig:
    """
    One model as the configuration declares it.

    @ivar name: The public model id that clients send as C{model}.
    @ivar aliases: Other ids clients may send for it; a request is answered
        under the id it used.
    @ivar listed: Whether C{GET /v1/models} lists it (an unlisted model is
        served all the same).
    @ivar path: The model file or directory, made absolute.
    @ivar backend: Which kind of server runs it.
    @ivar model_type: What it does; decides which endpoints accept it.
    @ivar vram_mb: The memory it holds while loading and loaded.
    @ivar unload_time: Idle seconds before it is stopped (C{inf}: never);
        C{None} defers to the global C{idle_timeout_seconds}.
    @ivar load_timeout_seconds: How long a load may take; C{None} defers to
        the global setting.
    @ivar backend_idle_timeout_seconds: How long a relayed request may wait
        for its backend's next byte before it is ended (C{math.inf}: never);
        C{None} defers to the global setting.
    @ivar priority: Its requests' place in the queue for memory (higher is
        served first; a request's C{X-DynLLM-Priority} overrides it), and
        its place when idle models are evicted (lowest first).
    @ivar extra_args: Appended to the backend's command line.
    @ivar env: Added to the backend's environment.
    @ivar command: The command line of a C{command} backend, with
        placeholders (L{dynllm.placeholders}); C{extra_args} follow it.
    @ivar ready: How a C{command} backend's readiness is seen.
    @ivar endpoints: Which routes a C{command} backend serves, and where
        (route -> upstream path); C{None}: the OpenAI routes of its
        C{model_type} at their own paths (L{dynllm.endpoints}).
    @ivar upstream_model: What a C{command} backend gets as a request's
        C{model}: C{name}, C{path}, C{keep} (the name the client sent) or
        any other string, which is sent as it is.
    @ivar stop: How its server is stopped.
    @ivar created: When the model file (or directory) was last modified, in
        seconds since the epoch: what C{/v1/models} gives as C{created}.
    """

    name: str = _setting(_REQUIRED, _str)
    path: str = _setting("", _str)
    backend: str = _setting(_REQUIRED, _oneOf(*BACKEND_KINDS))
    vram_mb: int = _setting(_REQUIRED, _nonNegativeInt)
    model_type: str = _setting("llm", _oneOf(*MODEL_TYPES))
    aliases: tuple[str, ...] = _setting((), lambda v, w: _strList(v, w, nonEmpty=True))
    listed: bool = _setting(True, _bool)
    unload_time: float | None = _setting(None, _timeout)
    load_timeout_seconds: float | None = _setting(None, _positiveNumber)
    backend_idle_timeout_seconds: float | None = _setting(None, _optionalTimeout)
    priority: int = _setting(0, _int)
    extra_args: tuple[str, ...] = _setting((), _argList)
    env: Mapping[str, str] = _setting({}, _envMapping)
    # llama.cpp
    n_gpu_layers: int = _setting(-1, _int)
    context_size: int = _setting(4096, _nonNegativeInt)
    # OpenVINO Model Server
    target_device: str = _setting("CPU", _str)
    ovms_shape: str | None = _setting(None, _optionalStr)
    # transformers serve
    device: str = _setting("auto", _str)
    dtype: str = _setting("auto", _str)
    quantization: str | None = _setting(None, _optionalOneOf("none", "bnb-4bit", "bnb-8bit"))
    trust_remote_code: bool = _setting(False, _bool)
    compile_model: bool = _setting(False, _bool)
    continuous_batching: bool = _setting(False, _bool)
    attn_implementation: str | None = _setting(None, _optionalStr)
    model_timeout: float | None = _setting(None, _timeout)
    revision: str | None = _setting(None, _optionalStr)
    # any server (backend: command)
    command: tuple[str, ...] = _setting((), _command)
    ready: ReadyConfig = _setting(ReadyConfig(), _ready)
    endpoints: Mapping[str, str] | None = _setting(None, _endpoints)
    upstream_model: str = _setting("name", _str)
    # every backend
    stop: StopConfig = _setting(StopConfig(), _stop)
    #: Keys that the file set explicitly (for backend-specific checks).
    explicit: frozenset[str] = frozenset()
    created: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        """
        Every id the model answers to: its name, then its aliases.
        """
        return (self.name, *self.aliases)

    def placeholders(self, port: int, apiKey: str | None = None) -> dict[str, str]:
        """
        @param port: The port of the run.
        @param apiKey: The run's key, if it has one.
        @return: the value of each placeholder (L{dynllm.placeholders}) for
            a run of this model on C{port}: C{host} is always C{127.0.0.1}.
        """
        return {"port": str(port), "host": "127.0.0.1", "name": self.name, "path": self.path, "api_key": apiKey or ""}

    def environment(self, port: int, apiKey: str | None = None) -> dict[str, str]:
        """
        @return: the model's C{env}, for a run on C{port}: a C{command}
            model's values with their placeholders filled in (so that
            C{{api_key}} can go to a variable, which other local users
            cannot read, rather than to the command line, which they can);
            the other backends' values as they are.
        """
        if self.backend != COMMAND:
            return dict(self.env)
        values = self.placeholders(port, apiKey)
        return {name: expand(value, values) for name, value in self.env.items()}


@frozen
class Config:
    """
    The whole configuration of a daemon.

    @ivar models: The declared models, in file order.
    @ivar source: The file it was read from, if any (for messages).
    """

    server: ServerConfig = _section(ServerConfig)
    total_vram_mb: int = _setting(8192, _nonNegativeInt)
    idle_timeout_seconds: float = _setting(300.0, lambda v, w: _timeout(v, w) or 0.0)
    idle_check_interval_seconds: float = _setting(1.0, _positiveNumber)
    load_timeout_seconds: float = _setting(300.0, _positiveNumber)
    queue_timeout_seconds: float = _setting(60.0, _positiveNumber)
    backend_idle_timeout_seconds: float = _setting(300.0, lambda v, w: _optionalTimeout(v, w) or math.inf)
    eviction_policy: str = _setting("lifo", _oneOf(*EVICTION_POLICIES))
    max_request_body_mb: float = _setting(64.0, _positiveNumber)
    shutdown_timeout_seconds: float = _setting(30.0, _nonNegativeNumber)
    enabled_backends: tuple[str, ...] = _setting(("llamacpp", "openvino"), _strList)
    models_dir: str | None = _setting(None, _optionalStr)
    db_path: str = _setting("dynllm_state.db", _str)
    log_level: str = _setting("info", _oneOf("debug", "info", "warning", "error"))
    log_format: str = _setting("text", _oneOf("text", "json"))
    preload_models: tuple[str, ...] = _setting((), _strList)
    backend: BackendSettings = _section(BackendSettings)
    models: tuple[ModelConfig, ...] = _setting((), lambda v, w: v)
    source: str | None = None

    def model(self, name: str) -> ModelConfig | None:
        """
        @return: the model called C{name} or aliased so, or C{None}.
        """
        for m in self.models:
            if m.name == name or name in m.aliases:
                return m
        return None

    def idleTimeout(self, model: ModelConfig) -> float:
        """
        @return: seconds of idleness after which C{model} is stopped.
        """
        return self.idle_timeout_seconds if model.unload_time is None else model.unload_time

    def backendIdleTimeout(self, model: ModelConfig) -> float:
        """
        @return: seconds a relayed request to C{model} may wait for its
            backend's next byte (C{math.inf}: for ever).
        """
        if model.backend_idle_timeout_seconds is None:
            return self.backend_idle_timeout_seconds
        return model.backend_idle_timeout_seconds

    def loadTimeout(self, model: ModelConfig) -> float:
        """
        @return: seconds that C{model} may take to become ready.
        """
        if model.load_timeout_seconds is None:
            return self.load_timeout_seconds
        return model.load_timeout_seconds


def _modelPlace(index: int, raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"models[{index}] ({name!r})" if isinstance(name, str) else f"models[{index}]"


def parseConfig(
    raw: Any,
    baseDir: str = ".",
    source: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
    *,
    checkState: bool = False,
) -> Config:
    """
    Validate a parsed YAML document and build a L{Config}.

    Every problem is found before anything is raised: each key and each
    model is checked, and a check that needs a key that was refused (or
    missing) is left out, so that one mistake is reported once (a model
    whose C{backend} is unknown gets no word about the fields of other
    backends).

    @param raw: The document, as C{yaml.safe_load} returns it.
    @param baseDir: The directory relative paths (C{models_dir}, C{db_path})
        are taken from: the config file's directory.
    @param source: The file name, used in messages.
    @param which: Looks a program name up on C{PATH}.
    @param checkState: Also check that C{db_path}'s directory exists and can
        be written, as the daemon needs (L{dynllm.tap} asks for it); a
        program that keeps its state in memory
        (C{makeService(persist=False)}) has no use for C{db_path}.
    @raise ConfigError: listing every problem, in file order (then the
        names that C{preload_models} gives but no model has, then
        C{db_path}'s directory).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a YAML mapping", source=source)
    problems = _Problems()
    rawModels = raw.get("models", [])
    if not isinstance(rawModels, list):
        problems.add("models must be a list of model declarations")
        rawModels = []
    top = {k: v for k, v in raw.items() if k != "models"}
    built = _build(Config, top, "", problems, source=source)
    config: Config = built.value

    unknownBackends = [b for b in config.enabled_backends if b not in BACKEND_KINDS]
    for backend in unknownBackends:
        problems.add(
            f"enabled_backends names unknown backend {backend!r}"
            f" (known: {', '.join(BACKEND_KINDS)})"
        )
    settings = config.backend
    if (
        built.ok("backend.port_range_start")
        and built.ok("backend.port_range_end")
        and settings.port_range_end < settings.port_range_start
    ):
        problems.add(
            f"backend.port_range_end ({settings.port_range_end}) is below"
            f" backend.port_range_start ({settings.port_range_start})"
        )

    modelsDir = config.models_dir
    if modelsDir is not None:
        modelsDir = os.path.join(baseDir, os.path.expanduser(modelsDir))
    checks = _ModelChecks(config, built, modelsDir or baseDir, which, problems)
    models = []
    for index, rawModel in enumerate(rawModels):
        place = _modelPlace(index, rawModel)
        model = _build(
            ModelConfig,
            rawModel,
            place,
            problems,
            explicit=frozenset(rawModel) if isinstance(rawModel, dict) else frozenset(),
        )
        models.append(checks.check(model, place))

    if built.ok("preload_models"):
        for name in config.preload_models:
            if name not in checks.seen:
                problems.add(f"preload_models names {name!r}, which is not a configured model")
    dbPath = os.path.join(baseDir, os.path.expanduser(config.db_path))
    if checkState and built.ok("db_path"):
        _checkStateDirectory(dbPath, problems)
    if problems.found:
        raise ConfigError(*problems.found, source=source)
    byName = {n: m.name for m in models for n in m.names}
    preload = tuple(dict.fromkeys(byName[n] for n in config.preload_models))
    return evolve(config, models_dir=modelsDir, db_path=dbPath, models=tuple(models), preload_models=preload)


def _checkStateDirectory(dbPath: str, problems: _Problems) -> None:
    """
    The directory of the state database exists and this user may create
    files in it (the database, its journal and its lock file).

    @param dbPath: C{db_path}, resolved.
    """
    directory = os.path.dirname(dbPath)
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        problems.add(
            f"db_path: the directory {directory!r} of {dbPath!r} {what}"
            " (create it, writable by the user dynllm runs as, or choose another)"
        )
    elif not os.access(directory, os.W_OK | os.X_OK):
        problems.add(
            f"db_path: the directory {directory!r} of {dbPath!r} cannot be written by this user"
            " (the database, its journal and its lock file are made there)"
        )


class _ModelChecks:
    """
    The checks of each model that need the rest of the configuration, in
    file order.

    @ivar seen: Each name and alias of the models checked so far, with the
        model it belongs to (for messages).
    """

    def __init__(
        self,
        config: Config,
        built: _Built,
        modelsDir: str,
        which: Callable[[str], str | None],
        problems: _Problems,
    ) -> None:
        """
        @param config: The top level, checked.
        @param built: Which of its keys were refused (their checks are left
            out).
        @param modelsDir: The directory model paths are taken from.
        @param which: Looks a program name up on C{PATH}.
        @param problems: Where problems go.
        """
        self.config = config
        self.built = built
        self.modelsDir = modelsDir
        self.which = which
        self.problems = problems
        self.seen: dict[str, str] = {}
        #: Each program looked up, and whether it was found: a program is
        #: looked up, and a missing one reported, once.
        self.programs: dict[str, bool] = {}
        #: Whether C{models_dir} is a directory, once a relative model path
        #: needed it.
        self.modelsDirFound: bool | None = None
        #: The stop commands that name no run ({name}, {port}), by the
        #: first model that has each.
        self.fixedStops: dict[tuple[str, ...], str] = {}

    def check(self, built: _Built, place: str) -> ModelConfig:
        """
        Check one model, recording its problems.

        @param built: The model as L{_build} made it.
        @param place: Where it is in the file, for messages.
        @return: the model, with its path made absolute when it exists
            (only a model without problems leaves L{parseConfig}).
        """
        model: ModelConfig = built.value
        ok = built.ok
        add = self.problems.add
        if "" in built.refused:
            return model
        if ok("name"):
            if model.name in self.seen:
                add(f"{place}: duplicate model name {model.name!r}")
            else:
                self.seen[model.name] = f"a name of model {model.name!r} ({place})"
        if ok("aliases"):
            self._checkAliases(model, place, ok("name"))
        backendKnown = ok("backend")
        # Whether the backend's program is needed: not while the backend is
        # not enabled, or the list of enabled ones was refused.
        needsProgram = backendKnown and self.built.ok("enabled_backends")
        if needsProgram and model.backend not in self.config.enabled_backends:
            needsProgram = False
            add(
                f"{place}.backend: backend {model.backend!r} is not in enabled_backends"
                f" ({', '.join(self.config.enabled_backends)})"
            )
        if backendKnown and ok("model_type") and model.model_type not in BACKEND_MODEL_TYPES[model.backend]:
            add(
                f"{place}.model_type: backend {model.backend!r} cannot serve model_type"
                f" {model.model_type!r} (it serves {', '.join(BACKEND_MODEL_TYPES[model.backend])})"
            )
        # Fields of another backend: said once, not checked further.
        foreign: set[str] = set()
        if backendKnown:
            for key in sorted(model.explicit):
                kind = BACKEND_ONLY_FIELDS.get(key)
                if kind is not None and kind != model.backend:
                    foreign.add(key)
                    add(f"{place}.{key} applies only to backend {kind!r}, not {model.backend!r}")
            _checkOwned(model, place, ok, self.problems)
        if (
            ok("quantization")
            and ok("model_type")
            and "quantization" not in foreign
            and model.quantization not in (None, "none")
            and model.model_type != "llm"
        ):
            add(
                f"{place}.quantization: quantization applies only to model_type 'llm',"
                f" not {model.model_type!r}"
            )
        if ok("vram_mb") and self.built.ok("total_vram_mb") and model.vram_mb > self.config.total_vram_mb:
            add(
                f"{place}.vram_mb: {model.vram_mb} MB is larger than total_vram_mb"
                f" ({self.config.total_vram_mb} MB), so it could never be loaded"
            )
        isCommand = backendKnown and model.backend == COMMAND
        if isCommand:
            self._checkCommand(model, place, ok)
        elif "path" not in model.explicit and ok("path"):
            add(f"{place}.path is required")
        if ok("stop"):
            # A stop command of any backend reaches its server by {host} and {port}.
            for index, why in addressProblems(model.stop.command):
                add(f"{place}.stop.command[{index}]: {why}")
        path = None
        if isCommand and "path" not in model.explicit:
            pass
        elif ok("path") and self.built.ok("models_dir"):
            self._checkModelsDir(model, place)
            path = os.path.join(self.modelsDir, os.path.expanduser(model.path))
            if not os.path.exists(path):
                if not isCommand:
                    add(f"{place}.path: {path!r} does not exist{self._preloadNote(model)}")
                # A command's path may name what is not a file (a Hub id, an image).
                path = None
            elif backendKnown and model.backend == "openvino":
                _checkOVMSGraph(model, place, path, ok, self.problems)
        if needsProgram:
            self._checkProgram(model, place)
        if ok("stop") and model.stop.command and "{" not in model.stop.command[0]:
            self._checkStopProgram(model.stop.command[0], f"{place}.stop.command[0]")
        if ok("stop") and model.stop.command:
            self._checkSharedStop(model.stop.command, place)
        if path is None:
            return model
        return evolve(model, path=os.path.abspath(path), created=int(os.stat(path).st_mtime))

    def _checkCommand(self, model: ModelConfig, place: str, ok: Callable[[str], bool]) -> None:
        """
        The keys of a C{command} backend: a command is given; its
        placeholders, those of C{extra_args}, C{env} and C{stop.command} are
        known (C{{path}} only with a C{path}); neither it nor C{extra_args}
        names a listen port or host literally; its routes serve its
        C{model_type}.
        """
        add = self.problems.add
        if ok("command") and not model.command:
            add(f"{place}.command is required for backend 'command' (the server's command line, with {{port}})")
        if ok("extra_args"):
            for problem in _placeholderProblems(model.extra_args, f"{place}.extra_args"):
                add(problem)
        if ok("env"):
            for name, value in model.env.items():
                try:
                    used = placeholdersIn(value)
                except PlaceholderError as e:
                    add(f"{place}.env.{name}: {e}")
                    continue
                if "path" in used and "path" not in model.explicit:
                    add(f"{place}.env.{name}: {{path}} is used but the model has no path")
                wanted = name.lower() if name.upper() in ("PORT", "HOST") else None
                if wanted is not None and wanted not in used:
                    add(f"{place}.env.{name}: {value!r} sets the listen {wanted}; dynllm owns it: write {{{wanted}}}")
                elif wanted is None and LISTEN_ALL_IN.search(value):
                    add(
                        f"{place}.env.{name}: {value!r} names every interface, which would open the server"
                        " to the network; dynllm owns the address: write {host}"
                    )
        keys = (("command", model.command), ("extra_args", model.extra_args), ("stop.command", model.stop.command))
        for key, args in keys:
            if not ok(key.partition(".")[0]):
                continue
            for index, arg in enumerate(args):
                try:
                    used = placeholdersIn(arg)
                except PlaceholderError:
                    continue
                if "path" in used and "path" not in model.explicit:
                    add(f"{place}.{key}[{index}]: {{path}} is used but the model has no path")
        if ok("upstream_model") and model.upstream_model == "path" and "path" not in model.explicit:
            add(f"{place}.upstream_model: 'path' sends the model's path, but the model has no path")
        launch = (model.command if ok("command") else ()) + (model.extra_args if ok("extra_args") else ())
        literal = addressProblems(launch)
        for index, why in literal:
            key = f"command[{index}]" if index < len(model.command) else f"extra_args[{index - len(model.command)}]"
            add(f"{place}.{key}: {why}")
        if not literal and ok("command") and model.command and ok("extra_args") and ok("env"):
            if not any(_uses(t, "port") for t in (*launch, *model.env.values())):
                add(
                    f"{place}.command: {{port}} is in none of command, extra_args and env; dynllm chooses"
                    " the port and looks for the server there, so the server must be told it"
                )
        if ok("endpoints") and ok("model_type") and model.endpoints is not None:
            for route in model.endpoints:
                endpoint = endpointOf(route)
                assert endpoint is not None
                if model.model_type not in endpoint.modelTypes:
                    add(
                        f"{place}.endpoints: {route} serves model types {', '.join(endpoint.modelTypes)},"
                        f" not {model.model_type!r}"
                    )

    def _checkAliases(self, model: ModelConfig, place: str, nameKnown: bool) -> None:
        """
        Each alias differs from the model's name, from its other aliases and
        from every earlier model's names; each one is recorded as seen.
        """
        for index, alias in enumerate(model.aliases):
            earlier = model.aliases[:index]
            if alias in earlier:
                # Said once, at its second appearance.
                if earlier.count(alias) == 1:
                    self.problems.add(f"{place}.aliases: {alias!r} is given twice (the name and aliases must differ)")
            elif nameKnown and alias == model.name:
                self.problems.add(f"{place}.aliases: {alias!r} is given twice (the name and aliases must differ)")
            elif alias in self.seen:
                self.problems.add(
                    f"{place}.aliases: {alias!r} is already {self.seen[alias]}"
                    " (names and aliases must be unique across all models)"
                )
            else:
                self.seen[alias] = f"a name of model {model.name!r} ({place})"

    def _preloadNote(self, model: ModelConfig) -> str:
        """
        @return: a note that C{preload_models} names the model too (so that
            whoever removes the model removes it there in the same round),
            or nothing.
        """
        if not self.built.ok("preload_models"):
            return ""
        named = [name for name in model.names if name in self.config.preload_models]
        return " (preload_models names it too: remove it there as well if you remove the model)" if named else ""

    def _checkModelsDir(self, model: ModelConfig, place: str) -> None:
        """
        A relative path needs C{models_dir} (when it is set) to be a
        directory; when it is not, that is said once, at the first model
        whose path is relative (each such path is then said not to exist,
        which tells which files the models need).
        """
        if self.config.models_dir is None or os.path.isabs(os.path.expanduser(model.path)):
            return
        if self.modelsDirFound is None:
            self.modelsDirFound = os.path.isdir(self.modelsDir)
            if not self.modelsDirFound:
                self.problems.add(
                    f"models_dir: {self.modelsDir!r} is not a directory, and relative model"
                    f" paths are taken from it (first {place}.path: {model.path!r})"
                )

    def _checkSharedStop(self, command: tuple[str, ...], place: str) -> None:
        """
        Two models may not have the same stop command naming neither
        C{{name}} nor C{{port}} (C{docker stop vllm} twice): stopping one
        would stop the other's server.
        """
        if any(_uses(arg, "name") or _uses(arg, "port") for arg in command):
            return
        first = self.fixedStops.setdefault(command, place)
        if first != place:
            self.problems.add(
                f"{place}.stop.command: {first} has the same one, and it names neither {{name}} nor {{port}}:"
                " stopping one model would stop the other's server"
            )

    def _checkStopProgram(self, binary: str, where: str) -> None:
        """
        The program of a model's C{stop.command} can be found (one that
        cannot would leave the server to KILL after the timeout, and a
        container behind it running).
        """
        if binary not in self.programs:
            self.programs[binary] = self.which(binary) is not None
        if not self.programs[binary]:
            self.problems.add(f"{where}: the program {binary!r} was not found (give its path)")

    def _checkProgram(self, model: ModelConfig, place: str) -> None:
        """
        The program of the model's backend can be found; a missing one is
        reported at the first model that needs it.
        """
        if model.backend == COMMAND:
            if not model.command or not model.command[0] or "{" in model.command[0]:
                return
            binary, where = model.command[0], f"{place}.command[0]"
            hint = "give its path"
        else:
            key = BackendSettings.BINARY_KEYS[model.backend]
            if not self.built.ok(f"backend.{key}"):
                return
            binary = self.config.backend.binaryFor(model.backend)
            where, hint = f"{place}.backend", f"set backend.{key} to its path"
        if binary in self.programs:
            return
        self.programs[binary] = self.which(binary) is not None
        if not self.programs[binary]:
            self.problems.add(f"{where}: the {model.backend} program {binary!r} was not found ({hint})")


def _checkOVMSGraph(model: ModelConfig, place: str, path: str, ok: Callable[[str], bool], problems: _Problems) -> None:
    """
    Refuse the single-model settings OVMS refuses for a model it serves as
    a MediaPipe graph: one that C{--task} builds (every model type but the
    KServe ones, L{KSERVE_TYPES}, which OVMS serves as classic models) or
    one whose directory holds its own
    L{OVMS_GRAPH_FILE}. OVMS exits 64 at model start on C{--shape} there
    ("Starting mediapipe graph with unsupported model settings",
    C{src/modelmanager.cpp}), and on C{--target_device} with a ready-made
    graph, whose device is written in the graph (C{src/cli_parser.cpp};
    C{backends.md} 3.9).

    @param path: The model's directory, resolved.
    @param ok: Whether a key of the model was accepted.
    @param problems: Where each problem, naming the model and the key, goes.
    """
    ownGraph = hasOwnGraph(path)
    if ownGraph:
        why = f"its directory holds its own {OVMS_GRAPH_FILE}"
    else:
        why = f"OVMS builds a MediaPipe graph for model_type {model.model_type!r}"
    if (
        ok("ovms_shape")
        and ok("model_type")
        and model.ovms_shape is not None
        and (ownGraph or model.model_type not in KSERVE_TYPES)
    ):
        problems.add(
            f"{place}.ovms_shape: OVMS refuses --shape for a model served by a MediaPipe graph"
            f" ({why}); only {', '.join(KSERVE_TYPES)} models without a graph take a shape"
        )
    if ownGraph and "target_device" in model.explicit:
        problems.add(
            f"{place}.target_device: OVMS refuses --target_device for a model that brings its own"
            f" {OVMS_GRAPH_FILE}; the device is set in that graph"
        )


def _checkOwned(model: ModelConfig, place: str, ok: Callable[[str], bool], problems: _Problems) -> None:
    """
    Refuse C{extra_args} and C{env} that set what dynllm sets itself (see
    L{dynllm.owned}), each one.

    @param ok: Whether a key of the model was accepted.
    @param problems: Where each problem, naming the model, the key and the
        setting, goes.
    """
    owned = OWNED[model.backend]
    if ok("extra_args"):
        for arg in model.extra_args:
            found = owned.flag(arg)
            if found is not None:
                flag, setting = found
                given = "" if arg == flag else f" (in {arg!r})"
                problems.add(
                    f"{place}.extra_args: {flag!r}{given} is set by dynllm ({setting.what} of"
                    f" {model.backend} backends) and cannot be given here"
                )
    if ok("env"):
        for name in model.env:
            variable = owned.variable(name)
            if variable is not None:
                problems.add(
                    f"{place}.env: {name!r} is set by dynllm ({variable.what} of"
                    f" {model.backend} backends) and cannot be given here"
                )


def loadConfig(
    path: str, which: Callable[[str], str | None] = shutil.which, *, checkState: bool = False
) -> Config:
    """
    Read and validate a configuration file.

    @param path: The YAML file.
    @param which: Looks a program name up on C{PATH}.
    @param checkState: See L{parseConfig}.
    @raise ConfigError: if it cannot be read or parsed (one problem), or
        listing every problem found by L{parseConfig}; its C{source} is
        C{path}, so that its message starts with the file name.
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the configuration: {e.strerror}", source=path) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source=path) from None
    return parseConfig(raw, os.path.dirname(os.path.abspath(path)), path, which, checkState=checkState)
