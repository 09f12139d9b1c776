"""Exceptions shared by modules that must not import each other (hosts <-> config)."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid setting. ``str()`` is ``"<key>: <message>"`` so the operator sees where.

    ``key`` is the dotted key (``pipe_connect.advertise_hosts[2]``), or the file name for
    errors that concern the whole file (unreadable, TOML syntax). ``source`` names the file or
    other origin of the settings when known (``parse_config`` sets it); it is not part of
    ``str()`` because callers usually print the file name themselves.
    """

    source: str | None = None

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
