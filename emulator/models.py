"""Model architecture read from a Hugging Face `config.json`.

Only what prices a forward pass and sizes memory: layer shapes, attention
heads, experts. Weight and KV bytes are derived here so that capacity and cost
formulas share one source of truth.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "fp8": 1, "float8": 1, "float8_e4m3fn": 1, "int8": 1,
    "fp4": 0.5, "nvfp4": 0.5, "mxfp4": 0.5, "int4": 0.5,
}


class UnknownModelError(ValueError):
    """No shipped config and no readable config.json for the given name."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    weight_dtype: str = "bfloat16"
    expert_weight_dtype: str = "bfloat16"  # routed experts (gpt-oss keeps only these in MXFP4)
    weight_block_size: tuple[int, int] | None = None  # block-wise FP8 scales [block_n, block_k] (DeepSeek-style)
    # Mixture of experts (0 experts = dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_dense_layers: int = 0  # leading dense layers in an MoE model (DeepSeek first_k_dense_replace)
    # Multi-head latent attention (DeepSeek); kv_lora_rank 0 = ordinary attention.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # "sliding_attention" | "full_attention" per layer, when mixed
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # -- shape facts ------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def activation_bytes(self) -> int:
        return int(DTYPE_BYTES[self.dtype])

    # -- parameter counts -------------------------------------------------------------
    def attention_params(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk_head
                 if self.q_lora_rank else h * self.num_heads * qk_head)
            kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim)
                  + self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + self.num_heads * self.v_head_dim * h
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def expert_params(self) -> int:
        """One routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def moe_layer_params(self) -> int:
        shared = 3 * self.hidden_size * self.shared_expert_intermediate_size
        router = self.hidden_size * self.num_experts
        return self.num_experts * self.expert_params() + shared + router

    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        lm_head = 0 if self.tie_word_embeddings else embed
        norms = 2 * self.hidden_size * self.num_layers + self.hidden_size
        mlp = (self.num_dense_layers * self.dense_mlp_params() if self.is_moe
               else self.num_layers * self.dense_mlp_params())
        moe = self.num_moe_layers * self.moe_layer_params()
        return embed + lm_head + norms + self.num_layers * self.attention_params() + mlp + moe

    def active_params_per_token(self) -> int:
        """Parameters one token touches (routed experts count top-k times)."""
        if not self.is_moe:
            return self.num_params()
        inactive = self.num_moe_layers * (self.num_experts - self.num_experts_per_tok) * self.expert_params()
        return self.num_params() - inactive

    def expert_weight_bytes(self) -> float:
        """All routed experts of all MoE layers."""
        return self.num_moe_layers * self.num_experts * self.expert_params() * DTYPE_BYTES[self.expert_weight_dtype]

    def weight_bytes(self) -> float:
        """Weights in memory; embeddings and norms stay in the activation dtype."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        experts = self.num_moe_layers * self.num_experts * self.expert_params()
        rest = self.num_params() - embed - experts
        return embed * self.activation_bytes + rest * self.bytes_per_param + self.expert_weight_bytes()

    @property
    def num_sliding_layers(self) -> int:
        """Layers that attend only to the last `sliding_window` tokens."""
        if not self.sliding_window:
            return 0
        if not self.layer_types:
            return self.num_layers
        return sum(t == "sliding_attention" for t in self.layer_types)

    @property
    def mixes_sliding_window(self) -> bool:
        """Both sliding-window and full-attention layers: what vLLM's hybrid KV cache manager lays out in groups."""
        return 0 < self.num_sliding_layers < self.num_layers

    # -- KV cache ---------------------------------------------------------------------
    def kv_heads_per_device(self, tp: int) -> int:
        """vLLM replicates KV heads when TP exceeds their number."""
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token_per_layer(self, tp: int = 1, kv_dtype_bytes: float | None = None) -> float:
        b = self.activation_bytes if kv_dtype_bytes is None else kv_dtype_bytes
        if self.is_mla:  # one latent vector + rope key, replicated on every TP rank
            return (self.kv_lora_rank + self.qk_rope_head_dim) * b
        return 2 * self.kv_heads_per_device(tp) * self.head_dim * b


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def model_from_config(cfg: dict, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a parsed HF config.json (text part of multimodal configs too)."""
    text = cfg.get("text_config") or cfg
    try:
        hidden = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
    except KeyError as exc:
        raise UnknownModelError(f"config of {name or 'model'} lacks {exc.args[0]!r}") from None
    kv_heads = int(_first(text, "num_key_value_heads", default=heads))
    head_dim = int(_first(text, "head_dim", default=hidden // heads))
    dtype = str(_first(text, "torch_dtype", "dtype", default=cfg.get("torch_dtype", "bfloat16"))).replace("torch.", "")
    quant = cfg.get("quantization_config") or {}
    weight_dtype = dtype
    method = str(quant.get("quant_method", "")).lower()
    algo = str(quant.get("quant_algo", "")).lower()
    if (method in ("fp8", "fbgemm_fp8") or "fp8" in str(quant.get("format", ""))
            or (method == "modelopt" and "fp8" in algo)):
        weight_dtype = "fp8"
    elif method in ("nvfp4", "modelopt_fp4") or (method == "modelopt" and "fp4" in algo):
        weight_dtype = "fp4"
    elif method == "mxfp4":  # gpt-oss: MXFP4 experts, everything else stays in the model dtype
        weight_dtype = "fp4"
    elif method in ("awq", "gptq") or quant.get("bits") == 4:
        weight_dtype = "int4"
    elif method == "compressed-tensors":
        groups = quant.get("config_groups") or {}
        bits = {g.get("weights", {}).get("num_bits") for g in groups.values()}
        weight_dtype = "fp8" if 8 in bits else "int4" if 4 in bits else dtype
    expert_weight_dtype = weight_dtype
    if method == "mxfp4":
        weight_dtype = dtype
    num_experts = int(_first(text, "num_experts", "num_local_experts", "n_routed_experts", default=0) or 0)
    moe_inter = int(_first(text, "moe_intermediate_size", default=0) or 0)
    if num_experts and not moe_inter:  # Mixtral: experts are as wide as the dense MLP
        moe_inter = int(text["intermediate_size"])
    shared = int(_first(text, "shared_expert_intermediate_size", default=0) or 0)
    if not shared and text.get("n_shared_experts"):
        shared = int(text["n_shared_experts"]) * moe_inter
    sliding = text.get("sliding_window") if text.get("use_sliding_window", True) else None
    return ModelSpec(
        name=name or cfg.get("_name_or_path") or text.get("model_type", "model"),
        architecture=(cfg.get("architectures") or ["?"])[0],
        model_type=str(text.get("model_type", cfg.get("model_type", "?"))),
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_first(text, "intermediate_size", default=4 * hidden)),
        vocab_size=int(text["vocab_size"]),
        max_position_embeddings=int(_first(text, "max_position_embeddings", default=4096)),
        tie_word_embeddings=bool(_first(cfg, "tie_word_embeddings", default=text.get("tie_word_embeddings", False))),
        dtype=dtype,
        weight_dtype=weight_dtype,
        expert_weight_dtype=expert_weight_dtype,
        weight_block_size=(tuple(int(b) for b in quant["weight_block_size"][:2])
                           if quant.get("weight_block_size") else None),
        num_experts=num_experts,
        num_experts_per_tok=int(_first(text, "num_experts_per_tok", "num_experts_per_token", default=0) or 0),
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared,
        num_dense_layers=int(_first(text, "first_k_dense_replace", default=0) or 0),
        kv_lora_rank=int(_first(text, "kv_lora_rank", default=0) or 0),
        q_lora_rank=int(_first(text, "q_lora_rank", default=0) or 0),
        qk_rope_head_dim=int(_first(text, "qk_rope_head_dim", default=0) or 0),
        qk_nope_head_dim=int(_first(text, "qk_nope_head_dim", default=0) or 0),
        v_head_dim=int(_first(text, "v_head_dim", default=0) or 0),
        sliding_window=int(sliding) if sliding else None,
        layer_types=tuple(text.get("layer_types") or ()),
        raw=cfg,
    )


def _shipped_dir():
    # the package's own folder (importlib.resources would load zipfile, tempfile, ... for the same path)
    return Path(__file__).parent / "data" / "models"


def shipped_models() -> list[str]:
    """HF ids of the configs inside the package."""
    return sorted(p.name[:-5].replace("--", "/") for p in _shipped_dir().iterdir() if p.name.endswith(".json"))


# Instruct and chat variants have their base model's architecture (the same config.json): the
# words "-Instruct" and "-Chat" and Meta's older "Meta-" prefix are dropped to find it.
_VARIANT_WORD = re.compile(r"-(?:instruct|chat)(?=-|$)", re.IGNORECASE)


def _base_model_name(name: str) -> str:
    """"meta-llama/Meta-Llama-3.1-8B-Instruct" -> "meta-llama/Llama-3.1-8B"."""
    org, slash, model = name.rpartition("/")
    model = _VARIANT_WORD.sub("", model)
    if model.lower().startswith("meta-llama-"):
        model = model[len("meta-"):]
    return org + slash + model


def load_model(name_or_path: str) -> ModelSpec:
    """Resolve a model by HF id (shipped), by bare name, or from a local config.json/dir."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UnknownModelError(f"{path}: not valid JSON ({exc})") from None
        return model_from_config(cfg, name=str(path.parent if path.name == "config.json" else path))
    known = shipped_models()
    for wanted in (name_or_path.lower(), _base_model_name(name_or_path).lower()):
        for hf_id in known:
            if wanted in (hf_id.lower(), hf_id.split("/", 1)[1].lower()):
                cfg = json.loads((_shipped_dir() / (hf_id.replace("/", "--") + ".json")).read_text())
                return model_from_config(cfg, name=hf_id)
    import difflib  # only an error's hint needs it
    hint = difflib.get_close_matches(name_or_path, known + [k.split("/", 1)[1] for k in known], n=1)
    hint_text = f" Did you mean {hint[0]!r}?" if hint else ""
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: no config.json at that path and no shipped config.{hint_text} "
        f"Shipped: {', '.join(known)}. Pass a local directory holding the model's config.json to add one."
    )
