"""Exceptions shared by modules that must not import each other (hosts <-> config)."""

from __future__ import annotations

from collections.abc import Sequence


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

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """Every single error this stands for, so callers need not tell the two kinds apart."""
        return (self,)


class ConfigErrors(ConfigError):
    """Several invalid settings, all found in one pass (what ``load_config`` raises).

    ``str()`` joins every error with ``"; "`` (one log line, and ``pytest.raises(match=...)``
    sees them all); ``key`` and ``message`` are the first error's.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        # Flattened: a parser may itself raise ConfigErrors (every bad item of an array).
        self._errors = tuple(e for error in errors for e in error.errors)
        if not self._errors:
            raise ValueError("ConfigErrors needs at least one error")
        first = self._errors[0]
        super().__init__(first.key, first.message)
        self.args = ("; ".join(str(e) for e in self._errors),)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return self._errors
