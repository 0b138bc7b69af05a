"""
Tests for the presets of C{backend: command} in C{etc/presets/}: each is a
valid configuration, and says whether it is tested here or written from its
server's documentation.
"""

from __future__ import annotations

import glob
import os

import yaml
from twisted.trial.unittest import SynchronousTestCase

from dynllm.config import parseConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = os.path.join(ROOT, "etc", "presets")

#: The servers the issue asks presets for.
EXPECTED = {"llama-server.yaml", "vllm.yaml", "sglang.yaml", "whisper-server.yaml", "sd-server.yaml"}


def presetFiles() -> list[str]:
    """
    @return: every preset file, sorted.
    """
    return sorted(glob.glob(os.path.join(PRESETS, "*.yaml")))


def loadPreset(path: str) -> dict:
    """
    @return: the preset's YAML document.
    """
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)  # type: ignore[no-any-return]


class PresetTests(SynchronousTestCase):
    """
    Every preset parses as a valid configuration of command models.
    """

    def test_expectedPresets(self) -> None:
        """
        There are presets for vLLM, SGLang, whisper.cpp's server,
        stable-diffusion.cpp's server and llama-server.
        """
        self.assertTrue(EXPECTED <= {os.path.basename(p) for p in presetFiles()})

    def test_eachParses(self) -> None:
        """
        Each preset is a valid configuration (its programs taken as found,
        its model paths need not exist) whose models all use C{backend:
        command}, each with a readiness and a stop.
        """
        for path in presetFiles():
            config = parseConfig(loadPreset(path), os.path.dirname(path), path, which=lambda name: "/usr/bin/" + name)
            self.assertTrue(config.models, path)
            for model in config.models:
                self.assertEqual(model.backend, "command", path)
                self.assertTrue(model.command, path)
                self.assertTrue(model.ready.http_path or model.ready.log, path)

    def test_eachSaysWhetherTested(self) -> None:
        """
        Each preset's opening comment says either that it is tested here
        (naming the test module) or that it is written from its server's
        documentation.
        """
        for path in presetFiles():
            with open(path, encoding="utf-8") as f:
                header = f.read().split("\nmodels:")[0]
            tested = "Tested here: tests/" in header
            documented = "Written from" in header and "not tested here" in header
            self.assertTrue(tested != documented, path)

    def test_testedPresets(self) -> None:
        """
        The llama-server, OVMS and transformers presets are the ones tested
        here (the three named backends written as commands).
        """
        for name in ("llama-server.yaml", "ovms.yaml", "transformers-serve.yaml"):
            with open(os.path.join(PRESETS, name), encoding="utf-8") as f:
                self.assertIn("Tested here: tests/test_commandservers.py", f.read())
