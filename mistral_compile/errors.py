"""User-facing error types: each renders as one line naming the file and the field."""

from __future__ import annotations


class MistralCompileError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class ConfigError(MistralCompileError):
    """A configuration value is missing, malformed or inconsistent.

    ``field`` is the name of the offending key; ``source`` (the file it came from) is attached by
    the reader that knows it, and ``key_names`` lets a reader show its own spelling of a field
    (``n_kv_heads`` in ``params.json`` instead of ``num_key_value_heads``).
    """

    def __init__(self, field: str | None, detail: str, source: str | None = None) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail
        self.source = source
        self.key_names: dict[str, str] = {}

    def __str__(self) -> str:
        parts = []
        if self.source:
            parts.append(self.source)
        if self.field:
            shown = self.key_names.get(self.field, self.field)
            label = shown if shown == self.field else f"{shown} ({self.field})"
            parts.append(f"field '{label}'")
        parts.append(self.detail)
        return ": ".join(parts)
