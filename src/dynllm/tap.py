# -*- test-case-name: tests.test_tap -*-
"""
The twistd plugin: C{twistd -n dynllm --config PATH}.
"""

from __future__ import annotations

from twisted.python import usage

from dynllm.config import ConfigError, loadConfig
from dynllm.service import DynLLMService
from dynllm.service import makeService as _makeService


class Options(usage.Options):
    """
    Command-line options of C{twistd dynllm}.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve an OpenAI-compatible API that starts local inference servers "
        "(llama.cpp, OpenVINO Model Server, transformers serve) on demand."
    )
    optParameters = [
        ["config", "c", "config.yaml", "Path to the YAML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["loadedConfig"] = loadConfig(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> DynLLMService:
    """
    @return: the daemon for the parsed C{options}; one that exits with a
        line naming C{db_path} when its state database cannot be used.
    """
    service = _makeService(options["loadedConfig"])
    service.exitOnStartError = True
    return service
