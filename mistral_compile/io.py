"""File helpers shared by every stage: JSON reading with one-line errors, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mistral_compile.errors import MistralCompileError


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON file whose top level must be an object; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MistralCompileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MistralCompileError(f"{path}: cannot read: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MistralCompileError(f"{path}: not valid JSON (line {err.lineno}, column "
                                  f"{err.colno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise MistralCompileError(f"{path}: expected a JSON object at the top level, "
                                  f"got {type(data).__name__}")
    return data


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a directory (and parents); a one-line error if that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MistralCompileError(f"{path}: exists and is not a directory") from None
    except OSError as err:
        raise MistralCompileError(f"{path}: cannot create output directory: "
                                  f"{err.strerror or err}") from None
    if not os.access(path, os.W_OK):
        raise MistralCompileError(f"{path}: output directory is not writable")
    return path


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place.

    A crash or error leaves either the old file or nothing, never a half-written one.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600: the usual file mode instead
    except OSError as err:
        raise MistralCompileError(f"{path}: cannot write: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise MistralCompileError(f"{path}: cannot write: {err.strerror or err}") from None
        raise
    return path
