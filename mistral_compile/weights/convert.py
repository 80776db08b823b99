"""convert-weight: checkpoint (HF or Mistral-native) -> fused, validated safetensors shards."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from mistral_compile.config import (
    NORMALIZED_NAME,
    MistralConfig,
    load_source_config,
    read_config,
)
from mistral_compile.config.readers import write_config
from mistral_compile.errors import MistralCompileError
from mistral_compile.io import current_umask, ensure_dir, read_json_object
from mistral_compile.tokenizer import TOKENIZER_FILES, tokenizer_record
from mistral_compile.weights.gguf_io import GGUFFile, is_gguf
from mistral_compile.weights.mapping import (
    GGUF,
    HF,
    IGNORED_SOURCE_SUFFIXES,
    NATIVE,
    ParamSource,
    build_name_map,
)
from mistral_compile.weights.quantize import Q4_FORMATS, pack_codes, quantize_as
from mistral_compile.weights.safetensors_io import SafetensorsFile
from mistral_compile.weights.verify import sha256_file

logger = logging.getLogger("mistral_compile.weights")

# quantization -> activation (and unquantized weight) dtype; q4f16_*: see weights/quantize.py
QUANTIZATIONS = {"q0f32": "float32", "q0f16": "float16", "q4f16_1": "float16",
                 "q4f16_2": "float16"}
MANIFEST_NAME = "mistral-weights.json"
MANIFEST_FORMAT = "mistral-compile-weights"
MANIFEST_VERSION = 1
SHARD_BYTES = 2 << 30
_FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass
class Checkpoint:
    """Where a checkpoint's config and tensors live."""

    config_path: Path
    source_format: str
    files: list[SafetensorsFile]


def find_checkpoint(source: Path, allow_pickle: bool = False) -> Checkpoint:
    """Locate config and weight files in a checkpoint directory (or a GGUF file)."""
    if is_gguf(source):
        return Checkpoint(source, GGUF, [GGUFFile(source)])
    if not source.is_dir():
        raise MistralCompileError(f"{source}: not a directory")
    index = source / "model.safetensors.index.json"
    hf_config, params = source / "config.json", source / "params.json"
    if hf_config.is_file() and (index.is_file() or (source / "model.safetensors").is_file()):
        names = _indexed_files(index) if index.is_file() else ["model.safetensors"]
        return Checkpoint(hf_config, HF, [_open(source / n) for n in names])
    if params.is_file() and (source / "consolidated.safetensors").is_file():
        return Checkpoint(params, NATIVE, [_open(source / "consolidated.safetensors")])
    pickles = sorted(p.name for p in source.iterdir()
                     if p.suffix in (".bin", ".pth", ".pt"))
    if pickles and not allow_pickle:
        raise MistralCompileError(f"{source}: only pickle checkpoints found ({pickles[0]}); "
                                  "pickle files can run code when loaded: convert them to "
                                  "safetensors, or pass --allow-pickle if you trust them")
    if pickles:
        return _pickle_checkpoint(source, pickles)
    raise MistralCompileError(f"{source}: no weights found (expected model.safetensors[.index"
                              ".json] with config.json, or consolidated.safetensors with "
                              "params.json)")


def _pickle_checkpoint(source: Path, pickles: list[str]) -> Checkpoint:
    """HF pytorch_model*.bin (+ index) with config.json, or consolidated.00.pth + params.json."""
    from mistral_compile.weights.pickle_io import PickleFile

    index = source / "pytorch_model.bin.index.json"
    if (source / "config.json").is_file():
        names = _indexed_files(index) if index.is_file() else \
            [n for n in pickles if n.startswith("pytorch_model") and n.endswith(".bin")]
        if names:
            return Checkpoint(source / "config.json", HF,
                              [PickleFile(_existing(source / n)) for n in names])
    if (source / "params.json").is_file():
        native = [n for n in pickles if n.startswith("consolidated")]
        if len(native) > 1:
            raise MistralCompileError(f"{source}: {len(native)} consolidated.*.pth files: "
                                      "tensor-parallel shards are not supported, merge them")
        if native:
            return Checkpoint(source / "params.json", NATIVE,
                              [PickleFile(source / native[0])])
    raise MistralCompileError(f"{source}: pickle files found ({', '.join(pickles)}) but no "
                              "config.json with pytorch_model*.bin, nor params.json with "
                              "consolidated.00.pth")


def _indexed_files(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's ``*.index.json`` names in its weight_map."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise MistralCompileError(f"{index}: field 'weight_map': missing or not an object")
    return sorted(set(weight_map.values()))


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise MistralCompileError(f"{path}: file not found (listed by the checkpoint)")
    return path


def _open(path: Path) -> SafetensorsFile:
    return SafetensorsFile(_existing(path))


def expected_params(config: MistralConfig, dtype: str, quantization: str | None = None
                    ) -> dict[str, tuple[tuple[int, ...], str]]:
    """Weight name -> (shape, dtype), straight from the model definition.

    The model-owned KV cache, also held as parameters, is the engine's to allocate.
    """
    from mistral_compile.model import MistralForCausalLM
    from mistral_compile.runtime.library import STATE_PREFIX

    model = MistralForCausalLM(config, quantization=quantization)
    model.to(dtype)
    return {name: (tuple(int(d) for d in p.shape), p.dtype)
            for name, p in model.named_parameters() if not name.startswith(STATE_PREFIX)}


def _locate(files: list[SafetensorsFile]) -> dict[str, SafetensorsFile]:
    where: dict[str, SafetensorsFile] = {}
    for f in files:
        for key in f.keys():
            if key in where:
                raise MistralCompileError(f"tensor '{key}' appears twice: in {where[key].path} "
                                          f"and {f.path}")
            where[key] = f
    return where


def _rope_to_rotate_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Interleaved (complex-pair) RoPE rows -> rotate-half rows, per head."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _checked_sources(name: str, spec: ParamSource, shape: tuple[int, ...],
                     where: dict[str, SafetensorsFile]) -> list[tuple[SafetensorsFile, str]]:
    """The (file, tensor) pairs ``name`` is made of, each present with the shape it needs."""
    out = []
    for i, src in enumerate(spec.sources):
        f = where.get(src)
        if f is None:
            raise MistralCompileError(f"tensor '{src}' is missing from the checkpoint "
                                      f"(needed for {name})")
        want = shape if spec.rows is None else (spec.rows[i], *shape[2 if spec.stacked else 1:])
        if f.shape(src) != want:
            raise MistralCompileError(f"{f.path}: tensor '{src}' has shape {list(f.shape(src))}"
                                      f", the config implies {list(want)}")
        if f.dtype_name(src) not in _FLOAT_DTYPES:
            raise MistralCompileError(f"{f.path}: tensor '{src}' has dtype "
                                      f"{f.dtype_name(src)}, expected a float type")
        out.append((f, src))
    return out


def _assemble(spec: ParamSource, parts: list[np.ndarray]) -> np.ndarray:
    """The sources' rows in our order (RoPE rows permuted where needed), concatenated."""
    parts = [_rope_to_rotate_half(p, spec.rope_heads[i]) if spec.rope_heads[i] else p
             for i, p in enumerate(parts)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _build_param(name: str, spec: ParamSource, shape: tuple[int, ...],
                 where: dict[str, SafetensorsFile], dtype: str) -> np.ndarray:
    sources = _checked_sources(name, spec, shape, where)
    parts = []
    for f, src in sources:
        w = f.get(src)
        if not np.isfinite(w).all():  # a NaN or inf weight would poison every output
            bad = int((~np.isfinite(w)).sum())
            raise MistralCompileError(f"{f.path}: tensor '{src}' holds {bad} NaN or infinite "
                                      "values")
        parts.append(w)
    out = _assemble(spec, parts)
    if spec.stacked:  # the experts' rows one after another: [E, rows, ...]
        out = out.reshape(shape)
    out = np.ascontiguousarray(out.astype(dtype))
    if dtype == "float16" and not np.isfinite(out).all():
        raise MistralCompileError(f"tensor '{name}': values beyond float16's range (65504); "
                                  "convert with --quantization q0f32")
    return out


def _stored_q4_blocks(name: str, spec: ParamSource, shape: tuple[int, ...],
                      where: dict[str, SafetensorsFile]) -> tuple[np.ndarray, ...] | None:
    """q4f16_2's (q_weight, q_scale, q_min) from GGUF Q4_0/Q4_1 blocks as they are stored.

    None unless every source is such a block tensor (then the weight is rounded from floats).
    """
    sources = _checked_sources(name, spec, shape, where)
    blocks = [f.q4_blocks(src) if isinstance(f, GGUFFile) else None for f, src in sources]
    if any(b is None for b in blocks):
        return None
    codes, scale, q_min = (np.ascontiguousarray(_assemble(spec, [b[i] for b in blocks]))
                           for i in range(3))
    return pack_codes(codes), scale, q_min


def convert_weight(source: str | os.PathLike, out_dir: str | os.PathLike,
                   quantization: str = "q0f16", allow_pickle: bool = False,
                   progress: bool = True, config: str | os.PathLike | None = None,
                   overrides: dict[str, Any] | None = None,
                   tokenizer_version: str | None = None, tokenizer: str | None = None) -> Path:
    """Convert a checkpoint directory into OUT_DIR (config, weight shards, tokenizer, manifest).

    The model's config is the checkpoint's own (with ``overrides`` applied), or ``config``: a
    ``mistral-config.json`` written by convert-config (overrides cannot be combined with it).

    Everything is written to a temporary sibling directory that is renamed to OUT_DIR at the
    end, so an interrupted run never leaves a directory that looks complete.
    """
    if quantization not in QUANTIZATIONS:
        raise MistralCompileError(f"--quantization {quantization!r} is not supported (choose "
                                  f"from {', '.join(QUANTIZATIONS)})")
    dtype = QUANTIZATIONS[quantization]
    source, out = Path(source), Path(out_dir)
    ckpt = find_checkpoint(source, allow_pickle)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if config is not None:
        if given:
            raise MistralCompileError(f"--config {config}: config overrides "
                                      f"({', '.join(sorted(given))}) cannot be combined with it; "
                                      "apply them with convert-config")
        config = read_config(config)
    else:
        config = load_source_config(ckpt.config_path, given)
    shapes = {k: shape for k, (shape, _) in expected_params(config, dtype).items()}
    name_map = build_name_map(config, ckpt.source_format)
    if set(name_map) != set(shapes):  # the map and the model must describe the same tensors
        raise RuntimeError(f"name map and model disagree: {set(name_map) ^ set(shapes)}")
    where = _locate(ckpt.files)
    used = {src for spec in name_map.values() for src in spec.sources}
    leftover = sorted(k for k in where if k not in used
                      and not k.endswith(IGNORED_SOURCE_SUFFIXES))
    if leftover:
        raise MistralCompileError(f"{where[leftover[0]].path}: unexpected tensor "
                                  f"'{leftover[0]}' (not used by a {config.num_hidden_layers}-"
                                  f"layer Mistral; {len(leftover)} such tensors)")
    if out.exists() and not (out / MANIFEST_NAME).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise MistralCompileError(f"{out}: exists and is not a converted model; choose "
                                      "another output directory")
    ensure_dir(out.parent)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    (tmp / ".owner").write_text(str(os.getpid()))  # lets a later run tell a dead one's leftovers
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make the model private
    try:
        manifest = _write_all(config, ckpt, name_map, shapes, where, dtype, quantization, tmp,
                              progress, tokenizer_version, tokenizer)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / ".owner").unlink()
        if out.exists():
            logger.warning("replacing the converted model in %s", out)
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def remove_stale_partials(out: Path) -> None:
    """Remove the ``.OUT.partial-*`` directories of conversions that were killed.

    A partial directory records its process id; one whose process is gone is removed (and
    said), one whose process still runs is left alone.
    """
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int((partial / ".owner").read_text())
            os.kill(pid, 0)
            continue  # still converting
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            pass  # no owner file (or unreadable): a leftover of an older version
        logger.warning("removing %s, left by a conversion that did not finish", partial)
        shutil.rmtree(partial, ignore_errors=True)


def _write_all(config: MistralConfig, ckpt: Checkpoint, name_map: dict[str, ParamSource],
               shapes: dict[str, tuple[int, ...]], where: dict[str, SafetensorsFile],
               dtype: str, quantization: str, tmp: Path, progress: bool,
               tokenizer_version: str | None, tokenizer: str | None) -> dict:
    params_meta, shard, shard_bytes, shard_files = [], {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            fname = f"params_shard_{len(shard_files)}.safetensors"
            save_file(shard, str(tmp / fname))
            shard_files.append(fname)
            shard, shard_bytes = {}, 0

    stored = expected_params(config, dtype, quantization)
    kept = 0
    for name in tqdm(list(shapes), desc="converting", unit="tensor", disable=not progress):
        base = name.removesuffix("weight")
        if base + "q_weight" in stored:
            values = _stored_q4_blocks(name, name_map[name], shapes[name], where) \
                if quantization == "q4f16_2" else None
            kept += values is not None
            if values is None:
                values = quantize_as(quantization, _build_param(name, name_map[name],
                                                                shapes[name], where, "float32"))
            arrays = dict(zip((base + s for s in Q4_FORMATS[quantization]), values, strict=True))
        else:
            arrays = {name: _build_param(name, name_map[name], shapes[name], where, dtype)}
        for key, value in arrays.items():
            if (value.shape, str(value.dtype)) != stored[key]:  # the model's own declaration
                raise RuntimeError(f"{key}: built {value.shape} {value.dtype}, the model "
                                   f"declares {stored[key]}")
            if shard and shard_bytes + value.nbytes > SHARD_BYTES:
                flush()
            shard[key] = value
            shard_bytes += value.nbytes
            params_meta.append({"name": key, "shape": list(value.shape),
                                "dtype": str(value.dtype),
                                "file": f"params_shard_{len(shard_files)}.safetensors"})
    flush()
    if kept:
        logger.info("%d weights kept as the GGUF's own Q4_0/Q4_1 blocks (no second rounding)",
                    kept)
    if {p["name"] for p in params_meta} != set(stored):
        raise RuntimeError(f"converted tensors and model disagree: "
                           f"{sorted({p['name'] for p in params_meta} ^ set(stored))[:3]}")
    write_config(config, tmp / NORMALIZED_NAME)
    copied = []
    if ckpt.source_format == GGUF:  # the tokenizer lives in the file's metadata
        from mistral_compile.tokenizer.gguf import write_gguf_tokenizer

        copied = write_gguf_tokenizer(ckpt.files[0], tmp)
    for fname in TOKENIZER_FILES if ckpt.source_format != GGUF else ():
        if (ckpt.config_path.parent / fname).is_file():
            shutil.copy2(ckpt.config_path.parent / fname, tmp / fname)
            copied.append(fname)
    names = [*shard_files, NORMALIZED_NAME, *copied]
    files = {f: sha256_file(tmp / f) for f in names}
    sizes = {f: (tmp / f).stat().st_size for f in names}
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
            "quantization": quantization, "dtype": dtype,
            "config_fingerprint": config.fingerprint(), "source_format": ckpt.source_format,
            "tokenizer": tokenizer_record(tmp, config.vocab_size, tokenizer, tokenizer_version),
            "params": params_meta, "files": files, "sizes": sizes}
