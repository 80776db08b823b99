"""Readers for Hugging Face config.json, Mistral-native params.json and our mistral-config.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from mistral_compile.config.config import MistralConfig
from mistral_compile.errors import ConfigError, MistralCompileError
from mistral_compile.io import atomic_write_text, read_json_object

logger = logging.getLogger("mistral_compile.config")

NORMALIZED_NAME = "mistral-config.json"
FORMAT_NAME = "mistral-compile-config"
FORMAT_VERSION = 1

HF_MODEL_TYPES = ("mistral", "ministral", "llama", "mixtral")
HF_ARCHITECTURES = ("MistralForCausalLM", "MinistralForCausalLM", "LlamaForCausalLM",
                    "MixtralForCausalLM")
# Llama configs that are still exactly Mistral without a window: these keys, if true, are not
_HF_BIASES = ("attention_bias", "mlp_bias")
_MOE_MODEL_TYPES = ("mixtral",)
_MOE_KEYS = ("num_local_experts", "num_experts_per_tok")
# transformers' MixtralConfig defaults, used where a mixtral config.json leaves a key out
_MIXTRAL_DEFAULTS = {"num_local_experts": 8, "num_experts_per_tok": 2}
MIXTRAL_PARAMS_ROPE_THETA = 1e6
# params.json "moe" block key -> MistralConfig field (mistral-inference's MoeArgs)
_PARAMS_MOE_KEYS = {"num_experts": "num_local_experts",
                    "num_experts_per_tok": "num_experts_per_tok"}
_FIELDS = tuple(f.name for f in dataclasses.fields(MistralConfig) if f.name != "kwargs")
_HF_DIRECT = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
              "rms_norm_eps", "vocab_size", "num_key_value_heads", "head_dim",
              "tie_word_embeddings")
_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "rms_norm_eps", "vocab_size")

# Mistral-native params.json key -> MistralConfig field (keys not listed go to kwargs as-is:
# sliding_window, rope_theta and max_seq_len are read from there by __post_init__).
PARAMS_KEY_MAP = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "hidden_dim": "intermediate_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "norm_eps": "rms_norm_eps",
    "vocab_size": "vocab_size",
    "tied_embeddings": "tie_word_embeddings",
}
# Older spellings seen in real params.json files -> the current key.
PARAMS_ALIASES = {"_sliding_window": "sliding_window", "tie_embeddings": "tied_embeddings"}
# params.json features that change the network; present and not null, they are refused.
_PARAMS_UNSUPPORTED = {
    "vision_encoder": "vision encoders (Pixtral-style multimodal models) are not supported yet",
    "multimodal": "multimodal (audio/vision) models are not supported yet",
    "quantization": "pre-quantized checkpoints are not supported yet",
    "quantization_config": "pre-quantized checkpoints are not supported yet",
    "lora": "LoRA adapters are not supported yet",
    "llama_4_scaling": "llama-4 attention scaling is not supported yet",
    "q_lora_rank": "multi-head latent attention (MLA) is not supported yet",
    "kv_lora_rank": "multi-head latent attention (MLA) is not supported yet",
}
_HF_UNSUPPORTED = {
    "quantization_config": "pre-quantized checkpoints are not supported yet",
    "text_config": "multimodal models are not supported yet",
}


def _build(args: dict[str, Any], kwargs: dict[str, Any], overrides: dict[str, Any] | None,
           key_names: dict[str, str]) -> MistralConfig:
    for name in _REQUIRED:
        if args.get(name) is None:
            err = ConfigError(name, "is required but missing or null")
            err.key_names = key_names
            raise err
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            raise ValueError(f"unknown MistralConfig field {name!r}")
        if value is not None:
            args[name] = value
    try:
        return MistralConfig(**args, kwargs=kwargs)
    except ConfigError as err:
        err.key_names = key_names
        raise


def from_hf(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> MistralConfig:
    """Build a config from a Hugging Face ``config.json`` dict (mistral / ministral)."""
    model_type = data.get("model_type")
    archs = data.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError("architectures", f"must be a list, got {archs!r}")
    moe = model_type in _MOE_MODEL_TYPES or any(a == "MixtralForCausalLM" for a in archs)
    if not moe:
        for key in _MOE_KEYS:
            if data.get(key) is not None:  # transformers would build this model dense
                raise ConfigError(key, f"is {data[key]!r}, but the model is not a Mixtral "
                                  f"(model_type {model_type!r}): transformers would read it "
                                  "as a dense model; say model_type 'mixtral'")
    if model_type is None and not archs:
        raise ConfigError("model_type", "is missing (and so is architectures): cannot tell "
                          "which model this is")
    if model_type is not None and model_type not in HF_MODEL_TYPES:
        raise ConfigError("model_type", f"{model_type!r} is not supported (expected one of "
                          f"{', '.join(HF_MODEL_TYPES)})")
    for arch in archs:
        if arch not in HF_ARCHITECTURES:
            raise ConfigError("architectures", f"{arch!r} is not supported (expected one of "
                              f"{', '.join(HF_ARCHITECTURES)})")
    for key, reason in _HF_UNSUPPORTED.items():
        if data.get(key) is not None:
            raise ConfigError(key, reason)
    for key in _HF_BIASES:
        if data.get(key) not in (None, False):
            raise ConfigError(key, f"is {data[key]!r}: projection biases are not supported "
                              "(Mistral and Llama-2 style models have none)")
    args = {k: data[k] for k in _HF_DIRECT if k in data}
    kwargs = {k: v for k, v in data.items() if k not in _HF_DIRECT and k not in _MOE_KEYS}
    if moe:
        for key, default in _MIXTRAL_DEFAULTS.items():
            if key not in data:
                logger.info("%s = %d (transformers' Mixtral default: the key is absent)", key,
                            default)
            args[key] = data.get(key, default)  # present and null: refused by the config
    return _build(args, kwargs, overrides, {})


def from_mistral_params(data: dict[str, Any],
                        overrides: dict[str, Any] | None = None) -> MistralConfig:
    """Build a config from a Mistral-native ``params.json`` dict."""
    data = dict(data)
    for old, new in PARAMS_ALIASES.items():
        if old in data:
            if data.get(new) is not None and data[new] != data[old]:
                raise ConfigError(old, f"conflicts with '{new}' (both given, different values)")
            data[new] = data.pop(old)
            logger.info("params.json key %s read as %s", old, new)
    for key, reason in _PARAMS_UNSUPPORTED.items():
        if data.get(key) is not None:
            raise ConfigError(key, reason)
    moe = data.pop("moe", None)
    moe_args: dict[str, Any] = {}
    if moe is not None:
        if not isinstance(moe, dict):
            raise ConfigError("moe", f"must be an object, got {moe!r}")
        for key, value in moe.items():
            if key not in _PARAMS_MOE_KEYS:
                raise ConfigError("moe", f"key {key!r} is not understood (expected "
                                  f"{', '.join(_PARAMS_MOE_KEYS)})")
            moe_args[_PARAMS_MOE_KEYS[key]] = value
        for key, name in _PARAMS_MOE_KEYS.items():
            if name not in moe_args:
                raise ConfigError("moe", f"has no {key!r}")
    model_type = data.pop("model_type", None)
    if model_type not in (None, "transformer"):
        raise ConfigError("model_type", f"{model_type!r} is not supported (expected "
                          "'transformer')")
    args: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in PARAMS_KEY_MAP:
            args[PARAMS_KEY_MAP[key]] = value
        else:
            kwargs[key] = value
    args.update(moe_args)
    if moe_args and kwargs.get("rope_theta") is None:
        # Mixtral's native params.json has no rope_theta: mistral-inference then uses 1e6, the
        # value Mixtral was trained with (its HF config.json says so). Dense params.json files
        # without one (Mistral-7B-v0.1) keep 10000, theirs.
        kwargs["rope_theta"] = MIXTRAL_PARAMS_ROPE_THETA
        logger.info("rope_theta = %s (a params.json with experts and no rope_theta: "
                    "mistral-inference's default)", MIXTRAL_PARAMS_ROPE_THETA)
    key_names = {field: key for key, field in PARAMS_KEY_MAP.items()}
    key_names.update({field: f"moe.{key}" for key, field in _PARAMS_MOE_KEYS.items()})
    return _build(args, kwargs, overrides, key_names)


def looks_like_params(data: dict[str, Any]) -> bool:
    """True for a Mistral-native params.json (``dim``/``n_layers``), False for HF config.json."""
    return "dim" in data or "n_layers" in data


def load_source_config(path: str | os.PathLike,
                       overrides: dict[str, Any] | None = None) -> MistralConfig:
    """Read ``config.json``, ``params.json`` (by name, else by keys) or a GGUF file's metadata."""
    from mistral_compile.weights.gguf_io import GGUFFile, is_gguf

    path = Path(path)
    if is_gguf(path):
        from mistral_compile.config.gguf import from_gguf

        return from_gguf(GGUFFile(path), overrides)
    data = read_json_object(path)
    native = path.name == "params.json" or (path.name != "config.json" and looks_like_params(data))
    try:
        if native:
            return from_mistral_params(data, overrides)
        return from_hf(data, overrides)
    except ConfigError as err:
        err.source = str(path)
        raise


# ---------------------------------------------------------------- our normalized file
def config_to_json(config: MistralConfig) -> str:
    """Serialize a settled config in our versioned format."""
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
           "fingerprint": config.fingerprint(), "config": config.to_dict()}
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def write_config(config: MistralConfig, path: str | os.PathLike) -> Path:
    """Write ``mistral-config.json`` atomically."""
    return atomic_write_text(path, config_to_json(config))


def read_config(path: str | os.PathLike) -> MistralConfig:
    """Read our ``mistral-config.json`` (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / NORMALIZED_NAME
    doc = read_json_object(path)
    if doc.get("format") != FORMAT_NAME:
        raise MistralCompileError(f"{path}: field 'format': expected {FORMAT_NAME!r}, got "
                                  f"{doc.get('format')!r} (not a mistral-compile config)")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise MistralCompileError(f"{path}: field 'format_version': {version!r} is not "
                                  f"supported (this version reads {FORMAT_VERSION})")
    fields = doc.get("config")
    if not isinstance(fields, dict):
        raise MistralCompileError(f"{path}: field 'config': expected an object")
    unknown = sorted(set(fields) - set(_FIELDS) - {"kwargs"})
    if unknown:
        raise MistralCompileError(f"{path}: field '{unknown[0]}': unknown config field")
    try:
        args = dict(fields)
        config = _build(args, args.pop("kwargs", None) or {}, None, {})
    except ConfigError as err:
        err.source = str(path)
        raise
    stored = doc.get("fingerprint")
    if stored is not None and stored != config.fingerprint():
        raise MistralCompileError(f"{path}: field 'fingerprint': does not match the config "
                                  "values (the file was edited or is corrupt)")
    return config


# ---------------------------------------------------------------- where a config comes from
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str | os.PathLike) -> Path:
    """Find the config file for SOURCE: a file, a directory, or a cached Hugging Face repo id."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("config.json", "params.json"):
            candidate = path / name
            if candidate.is_symlink() and not candidate.exists():
                raise MistralCompileError(f"{candidate}: a symbolic link that leads nowhere "
                                          "(dangling, or a loop)")
            if candidate.is_file():
                return candidate
        raise MistralCompileError(f"{path}: directory holds neither config.json nor params.json")
    if path.is_symlink():
        raise MistralCompileError(f"{path}: a symbolic link that leads nowhere (dangling, or a "
                                  "loop)")
    if _REPO_ID.match(str(source)):
        return _resolve_cached_repo(str(source))
    raise MistralCompileError(f"{source}: no such file or directory")


def _resolve_cached_repo(repo_id: str) -> Path:
    """Look a repo id up in the local Hugging Face cache only: never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True,
                                   allow_patterns=["config.json", "params.json"])
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise MistralCompileError(f"{repo_id}: not a local path, and not in the local Hugging "
                                  "Face cache (download it first, e.g. `hf download "
                                  f"{repo_id}`); nothing is fetched from the network") from None
    logger.info("resolved %s from the Hugging Face cache: %s", repo_id, folder)
    return resolve_source(folder)
