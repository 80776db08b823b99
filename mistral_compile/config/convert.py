"""convert-config: read a source config, apply overrides, write mistral-config.json."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from mistral_compile.config.config import MistralConfig
from mistral_compile.config.readers import (
    NORMALIZED_NAME,
    load_source_config,
    resolve_source,
    write_config,
)
from mistral_compile.io import ensure_dir

logger = logging.getLogger("mistral_compile.config")


def convert_config(source: str | os.PathLike, out_dir: str | os.PathLike,
                   overrides: dict[str, Any] | None = None) -> tuple[MistralConfig, Path]:
    """Normalize SOURCE (file, directory or cached repo id) into ``OUT_DIR/mistral-config.json``.

    ``overrides`` maps MistralConfig field names to values (None = keep the source's); they take
    part in derivation (an overridden window changes the derived context and chunk). The config
    is fully validated before anything is written.
    """
    path = resolve_source(source)
    logger.info("reading %s", path)
    config = load_source_config(path, overrides)
    out = ensure_dir(out_dir) / NORMALIZED_NAME
    write_config(config, out)
    return config, out
