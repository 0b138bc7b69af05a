# -*- test-case-name: tests.test_reload -*-
"""
What a configuration reload changes (C{SIGHUP}, C{POST /admin/reload}).

L{compare} tells two configurations apart: the models added, removed and
changed (by name), the global settings changed, and the settings that only
a restart can change (the listening address, C{db_path}), which refuse the
reload as a whole with L{RestartRequired}. Applying the changes is the
service's and the manager's business (L{dynllm.service.DynLLMService.reload},
L{dynllm.scheduler.ModelManager.reconfigure}).
"""

from __future__ import annotations

from typing import Any

from attrs import fields, frozen

from dynllm.config import Config

#: Settings that only a restart can change: the socket the daemon listens
#: on, and the state database it holds locked.
RESTART_ONLY = ("server.host", "server.port", "db_path")

#: Settings read once at start; a change is applied at the next start.
AT_START: tuple[str, ...] = ()


class RestartRequired(Exception):
    """
    The new configuration changes settings that only a restart can change;
    nothing of it was applied.

    @ivar keys: The settings, as C{server.port} or C{db_path}.
    """

    def __init__(self, keys: tuple[str, ...], old: Config, new: Config) -> None:
        self.keys = keys
        changes = ", ".join(f"{key} from {_value(old, key)!r} to {_value(new, key)!r}" for key in keys)
        super().__init__(f"the new configuration changes {changes}: restart dynllm to apply it (nothing was changed)")


def refusalLines(error: Exception) -> list[str]:
    """
    @param error: Why a reload changed nothing: a L{ConfigError} (with
        every problem of the file) or L{RestartRequired}.
    @return: the lines to log, one event each: a first line, then one per
        problem.
    """
    problems = getattr(error, "problems", None)
    if not problems or len(problems) == 1:
        return [f"the configuration was not reloaded: {' '.join(str(error).splitlines())}"]
    source = getattr(error, "source", None) or "the file"
    return [f"the configuration was not reloaded: {source} has {len(problems)} problems:"] + [
        f"  {problem}" for problem in problems
    ]


def _value(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


@frozen
class ConfigChanges:
    """
    The difference between a running configuration and a new one.

    @ivar added: Models only the new one declares, by name.
    @ivar removed: Models only the running one declares.
    @ivar changed: Models both declare, with different settings.
    @ivar settings: Global settings that differ, as dotted keys
        (C{total_vram_mb}, C{server.api_keys}).
    @ivar atStart: Of C{settings}, those applied only at the next start
        (L{AT_START}).
    """

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    atStart: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.settings)

    def asDict(self) -> dict[str, list[str]]:
        """
        @return: the changes as JSON-ready lists, as C{POST /admin/reload}
            answers them.
        """
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "settings": list(self.settings),
            "at_next_start": list(self.atStart),
        }

    def describe(self) -> str:
        """
        @return: one line for the log.
        """
        if not self:
            return "no changes"
        parts = []
        for label, names in (
            ("added", self.added),
            ("removed", self.removed),
            ("changed", self.changed),
            ("settings", self.settings),
        ):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return "; ".join(parts)


def _settingKeys(old: Config, new: Config) -> list[str]:
    keys = []
    for attribute in fields(Config):
        if attribute.name in ("models", "source"):
            continue
        before, after = getattr(old, attribute.name), getattr(new, attribute.name)
        if attribute.name in ("server", "backend"):
            for inner in fields(type(before)):
                if getattr(before, inner.name) != getattr(after, inner.name):
                    keys.append(f"{attribute.name}.{inner.name}")
        elif before != after:
            keys.append(attribute.name)
    return keys


def compare(old: Config, new: Config) -> ConfigChanges:
    """
    @param old: The running configuration.
    @param new: The configuration read again.
    @return: what differs.
    @raise RestartRequired: if the new one changes a setting of
        L{RESTART_ONLY}.
    """
    settings = _settingKeys(old, new)
    restart = tuple(key for key in settings if key in RESTART_ONLY)
    if restart:
        raise RestartRequired(restart, old, new)
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    return ConfigChanges(
        added=tuple(name for name in after if name not in before),
        removed=tuple(name for name in before if name not in after),
        changed=tuple(name for name in after if name in before and before[name] != after[name]),
        settings=tuple(settings),
        atStart=tuple(key for key in settings if key in AT_START),
    )
