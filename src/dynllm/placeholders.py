# -*- test-case-name: tests.test_placeholders -*-
"""
The placeholders of a command backend's command lines (C{command},
C{extra_args}, C{stop.command}): C{{port}}, C{{host}}, C{{name}}, C{{path}}
and C{{api_key}}, with C{{{} and C{}}} for literal braces, as Python's
C{str.format} reads them.

dynllm owns the address a backend listens on: the placeholders are the only
way to give it. L{addressProblems} finds the arguments that name a port or a
host literally, which the configuration refuses.

This module imports nothing of dynllm's, so that the configuration and the
backends can both read it.
"""

from __future__ import annotations

import os
import re
import shlex
import string
from typing import Mapping, Sequence

#: Every placeholder, with what it stands for (for messages and the README).
PLACEHOLDERS = {
    "port": "the TCP port dynllm chose for this run",
    "host": "the address to listen on (127.0.0.1)",
    "name": "the model's name",
    "path": "the model's path, made absolute when it exists",
    "api_key": "this run's random API key, which dynllm sends as Bearer",
}

#: Options that set a listen port, in the spellings servers use (llama.cpp,
#: vLLM, SGLang, whisper.cpp, uvicorn: C{--port}; stable-diffusion.cpp's
#: server: C{--listen-port}; Docker: C{-p}/C{--publish}). Their value must
#: hold C{{port}}.
PORT_FLAGS = (
    "--port", "-p", "--publish", "--listen-port", "--http-port", "--server-port",
    "--rest-port", "--rest_port",
)

#: Options that set a listen host (C{--host}: llama.cpp, vLLM, SGLang,
#: whisper.cpp; C{--listen-ip}: stable-diffusion.cpp's server; C{--listen},
#: C{--bind}: many others). Their value must hold C{{host}}.
HOST_FLAGS = (
    "--host", "--listen", "--listen-ip", "--listen-host", "--bind", "--bind-address", "--address",
    "--addr", "--rest_bind_address", "--ip",
)

#: A literal C{HOST:PORT} (an IPv4 address, C{localhost}, or an IPv6
#: address in brackets, then digits), as in C{0.0.0.0:8000} or
#: C{http://127.0.0.1:8080/}.
LITERAL_ADDRESS = re.compile(
    r"(?:(?<![\w.])(?:\d{1,3}(?:\.\d{1,3}){3}|localhost)|\[[0-9A-Fa-f:.]*\]):\d+", re.IGNORECASE
)

_FORMATTER = string.Formatter()


class PlaceholderError(ValueError):
    """
    A template cannot be expanded: a placeholder that is not one of
    L{PLACEHOLDERS}, or a lone brace.
    """


def placeholdersIn(template: str) -> list[str]:
    """
    @return: the placeholders C{template} uses, in order (C{{{} and C{}}}
        are literal braces, not placeholders).
    @raise PlaceholderError: for an unknown placeholder, a format
        specification or conversion (C{{port:05}}, C{{port!r}}), or a lone
        C{{} or C{}}.
    """
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as e:
        raise PlaceholderError(f"{e} (write {{{{ and }}}} for literal braces)") from None
    used = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS:
            raise PlaceholderError(
                f"unknown placeholder {{{field}}} (known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)};"
                " write {{ and }} for literal braces)"
            )
        if spec or conversion:
            raise PlaceholderError(f"placeholder {{{field}}} takes no format or conversion")
        used.append(field)
    return used


def expand(template: str, values: Mapping[str, str]) -> str:
    """
    @param values: Placeholder -> its value; every placeholder C{template}
        uses must be there.
    @return: C{template} with its placeholders replaced and C{{{}/C{}}}
        made single braces.
    @raise PlaceholderError: as L{placeholdersIn}.
    """
    placeholdersIn(template)
    return template.format_map(values)


def expandAll(templates: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """
    @return: each of C{templates} expanded (L{expand}).
    """
    return [expand(t, values) for t in templates]


#: Addresses that mean "every interface": a server told one of them is
#: open to the network, whatever else its line says.
LISTEN_ALL = ("0.0.0.0", "::", "[::]")

#: Programs that run a server in a container, whose C{-p}/C{--publish}
#: (L{PUBLISH_FLAGS}) maps a port of the host to one of the container's.
CONTAINER_PROGRAMS = ("docker", "podman", "nerdctl")

#: Docker's and Podman's options that publish a port (C{[IP:]HOST_PORT:CONTAINER_PORT});
#: their value must begin C{{host}:{port}:}.
PUBLISH_FLAGS = ("-p", "--publish")

#: Docker's and Podman's options that publish every port of the container
#: on every interface.
PUBLISH_ALL = ("-P", "--publish-all")

#: One of L{LISTEN_ALL} within a text (C{0.0.0.0:8000}, C{http://[::]:80}).
LISTEN_ALL_IN = re.compile(r"(?<![\w.:])(?:0\.0\.0\.0(?![\w.])|\[::\]|::(?![\w:]))")

#: Short options that take their value attached (C{-p8080}, as getopt
#: reads them).
_SHORT_PORT_FLAGS = tuple(f for f in PORT_FLAGS if not f.startswith("--"))


def _optionName(arg: str) -> tuple[str, str, str]:
    """
    @return: C{(name, "=", value)} of an option (C{name} of a long option
        lower-cased with C{_} read as C{-}, as argparse-based servers often
        accept; a short option's case kept: Docker's C{-P} is not C{-p}),
        or C{(arg, "", "")} for what is not an option.
    """
    if not arg.startswith("-"):
        return arg, "", ""
    name, eq, inline = arg.partition("=")
    if name.startswith("--"):
        name = name.lower().replace("_", "-")
    elif not eq and name[:2] in _SHORT_PORT_FLAGS and name[2:3].isdigit():
        # -p8080: the value attached.
        return name[:2], "=", arg[2:]
    return name, eq, inline


def _words(arg: str) -> list[str] | None:
    """
    @return: the words of an argument that is a command line of its own
        (C{sh -c "exec server --port 8080"}), or C{None} for one word.
    """
    if not any(c.isspace() for c in arg.strip()):
        return None
    try:
        return shlex.split(arg)
    except ValueError:
        return arg.split()


def addressProblems(args: Sequence[str], shell: bool = False) -> list[tuple[int, str]]:
    """
    Find the arguments that set a listen port or host other than through
    C{{port}} and C{{host}}: a port option (L{PORT_FLAGS}) whose value
    lacks C{{port}}, a host option (L{HOST_FLAGS}) whose value lacks
    C{{host}}, in the C{--flag value}, C{--flag=value} and C{-p8080}
    forms (long options in any case, with C{_} for C{-}), any literal
    C{HOST:PORT} (L{LITERAL_ADDRESS}), and any of L{LISTEN_ALL}. An
    argument that is a command line of its own (C{sh -c "..."}) has its
    words checked the same way, where a value that is a shell variable
    (C{--port "$1"}, given C{{port}} as an argument) is accepted.

    @param args: A command line, as configured (not yet expanded).
    @param shell: Whether C{args} are the words of a shell command.
    @return: C{(index, why)} of each, in order.
    """
    found: list[tuple[int, str]] = []
    container = bool(args) and os.path.basename(args[0]) in CONTAINER_PROGRAMS
    index = 0
    while index < len(args):
        arg = args[index]
        if container and arg in PUBLISH_ALL:
            found.append((index, f"{arg!r} publishes the container's ports on every interface; dynllm owns"
                                 " the address: write -p {host}:{port}:CONTAINER_PORT"))
            index += 1
            continue
        words = _words(arg)
        if words is not None:
            found.extend((index, why) for _, why in addressProblems(words, shell=True))
            index += 1
            continue
        name, eq, inline = _optionName(arg)
        wanted = "port" if name in PORT_FLAGS else "host" if name in HOST_FLAGS else None
        if wanted is not None:
            if eq:
                value, at = inline, index
            elif index + 1 < len(args):
                value, at = args[index + 1], index + 1
                index += 1
            else:
                value, at = "", index
            shown = arg.partition("=")[0] if arg.startswith("--") else name
            publishes = name in PUBLISH_FLAGS and (container or ":" in value)
            if publishes and not value.startswith("{host}:{port}" + (":" if container else "")):
                # Docker's -p [IP:]HOST_PORT:CONTAINER_PORT: without the IP
                # it publishes on every interface.
                found.append((at, f"{shown} {value!r} must publish on dynllm's address, which it owns: write"
                                  " {host}:{port}:CONTAINER_PORT (without an address it publishes on every interface)"))
            elif "{" + wanted + "}" not in value and not (shell and value.startswith("$")):
                found.append((at, f"{shown} {value!r} sets the listen {wanted}; dynllm owns it: write {{{wanted}}}"))
        elif (inline if eq else arg) in LISTEN_ALL:
            found.append(
                (index, f"{arg!r} names every interface, which would open the server to the network;"
                        " dynllm owns the address: write {host}")
            )
        else:
            match = LITERAL_ADDRESS.search(arg)
            if match is not None:
                found.append(
                    (index, f"{arg!r} names the address {match.group(0)!r}; dynllm owns it: write {{host}}:{{port}}")
                )
        index += 1
    return found
