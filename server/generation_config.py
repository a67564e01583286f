"""The server's default sampling parameters: vLLM 0.33's ModelConfig.get_diff_sampling_param.

A request that leaves temperature, top_p, top_k, min_p, a penalty or skip_special_tokens out is sampled with
the value the model's `generation_config.json` sets (`--generation-config auto`, vLLM's default), else the
OpenAI one (temperature 1, top_p 1, ...). `--generation-config vllm` takes none from the model; a folder takes
that folder's file. `--override-generation-config` (JSON) goes over them. Its `max_new_tokens` is vLLM's
`max_tokens`. A model whose file sets none of these has no defaults.

The emulator reads no model files from the Hub: a shipped model's defaults are the sampling fields of its
Hub `generation_config.json` (below); a local model folder's are read from its own file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the fields vLLM takes from a generation config, in its order
SAMPLING_FIELDS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k", "top_p",
                   "min_p", "max_new_tokens", "skip_special_tokens")

_QWEN3 = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}   # Qwen3's thinking-mode recommendation
_LLAMA_3_1 = {"temperature": 0.6, "top_p": 0.9}
# The sampling fields of each shipped model's Hub generation_config.json ({}: it sets none). Instruct
# variants not listed take their base model's (Llama 3.1's are the same).
SHIPPED_GENERATION_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-30B-A3B": _QWEN3,
    "Qwen/Qwen3-32B": _QWEN3,
    "Qwen/Qwen3-235B-A22B-FP8": _QWEN3,
    "Qwen/Qwen3-30B-A3B-Instruct-2507": {"temperature": 0.7, "top_k": 20, "top_p": 0.8},
    "meta-llama/Llama-3.1-8B": _LLAMA_3_1,
    "meta-llama/Llama-3.1-70B": _LLAMA_3_1,
    "nvidia/Llama-3.1-8B-Instruct-FP8": _LLAMA_3_1,  # Llama-3.1-8B-Instruct's, which NVIDIA's copies
    "mistralai/Mixtral-8x7B-v0.1": {},
    "openai/gpt-oss-120b": {},
}
_BY_LOWER = {name.lower(): fields for name, fields in SHIPPED_GENERATION_CONFIGS.items()}


def model_generation_config(model: str) -> dict[str, Any]:
    """The generation config of `model`: a local folder's generation_config.json (none there: {}, as
    transformers finds no sampling field in a config.json), else the shipped table's, by the id or the
    shipped model it resolves to; {} for a model the table lacks."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _read(folder / "generation_config.json")
    if model.lower() in _BY_LOWER:
        return dict(_BY_LOWER[model.lower()])
    from emulator.models import UnknownModelError, load_model
    try:
        resolved = load_model(model).name
    except (UnknownModelError, ValueError, OSError):
        return {}
    return dict(_BY_LOWER.get(resolved.lower(), {}))


def default_sampling_params(model: str, generation_config: str = "auto",
                            override: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM's get_diff_sampling_param: the sampling fields set (not null) in the generation config of
    `generation_config` ("auto": the model's; "vllm": none; else a folder holding generation_config.json),
    with `override` over them; `max_new_tokens` named `max_tokens`. {} when none of them is set."""
    if generation_config == "vllm":
        config: dict[str, Any] = {}
    elif generation_config == "auto":
        config = model_generation_config(model)
    else:
        config = _named_config(generation_config)
    config.update(override or {})
    if not any(name in config for name in SAMPLING_FIELDS):
        return {}
    params = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    if "max_new_tokens" in params:
        params["max_tokens"] = params.pop("max_new_tokens")
    return params


def override_max_tokens(generation_config: str, defaults: dict[str, Any],
                        override: dict[str, Any] | None = None) -> int | None:
    """vLLM's serving override_max_tokens (the cap on a request's max_tokens): a folder's max_new_tokens,
    or with "auto"/"vllm" only --override-generation-config's (a model's own file never caps it)."""
    if generation_config not in ("auto", "vllm"):
        return defaults.get("max_tokens")
    return (override or {}).get("max_new_tokens")


def overridden_warning(defaults: dict[str, Any], generation_config: str) -> str | None:
    """The warning vLLM logs (logger vllm.config.model) once when a generation config changed its
    defaults; None when it did not, or under "vllm" (an override alone)."""
    if not defaults or generation_config == "vllm":
        return None
    source = "the model's `generation_config.json`" if generation_config == "auto" else generation_config
    return (f"Default vLLM sampling parameters have been overridden by {source}: `{defaults}`. If this is not "
            "intended, please relaunch vLLM instance with `--generation-config vllm`.")


@dataclass(frozen=True)
class SamplingDefaults:
    """What one served model's requests are sampled with where they leave a field out, as vLLM's serving
    classes hold it: `params` (default_sampling_params, get_diff_sampling_param's) and `max_tokens_cap`
    (override_max_tokens: the most output tokens any request gets; None: no cap)."""
    params: dict[str, Any] = field(default_factory=dict)
    max_tokens_cap: int | None = None


def sampling_defaults(model: str, generation_config: str = "auto",
                      override: dict[str, Any] | None = None) -> SamplingDefaults:
    """A served model's SamplingDefaults under --generation-config and --override-generation-config
    (ValueError: a --generation-config folder vLLM refuses)."""
    params = default_sampling_params(model, generation_config, override)
    return SamplingDefaults(params, override_max_tokens(generation_config, params, override))


def _named_config(source: str) -> dict[str, Any]:
    """--generation-config SOURCE: a folder's generation_config.json (a folder holding neither it nor a
    config.json is refused, as vLLM refuses it at start), or a shipped model's by its id."""
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / "generation_config.json").is_file() and not (folder / "config.json").is_file():
        raise ValueError(f"Invalid repository ID or local directory specified: '{source}'.")
    if not folder.is_dir() and source.lower() not in _BY_LOWER:
        raise ValueError(f"--generation-config {source}: no such folder (and no shipped model's id)")
    return model_generation_config(source)


def _read(path: Path) -> dict[str, Any]:
    """A generation_config.json's fields ({} where there is none to read)."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the generation config ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a generation config is a JSON object")
    return config
