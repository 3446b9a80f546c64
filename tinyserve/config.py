"""Typed model configuration, read from a Hugging Face folder's config.json (and a legacy quant_config.json).

Everything the runtime needs to know about a checkpoint comes from these dataclasses; nothing is guessed from file or
folder names. Model families differ only by the small `FAMILIES` table.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path


class ConfigError(ValueError):
    """The folder's configuration is missing, malformed or unsupported. The message is one line for the user."""


@dataclass(frozen=True)
class Family:
    """What differs between the supported decoder families (everything else is the shared Llama-style block)."""

    qkv_bias: bool | None  # None: read `attention_bias` from config.json (Llama); True/False: fixed by the family
    o_bias: bool | None
    mlp_bias: bool | None  # None: read `mlp_bias`


FAMILIES: dict[str, Family] = {
    # Llama-2/3 and SmolLM2: optional biases on q/k/v/o (`attention_bias`) and on the MLP (`mlp_bias`).
    "llama": Family(qkv_bias=None, o_bias=None, mlp_bias=None),
    # Mistral-style configs: the Llama block without biases (sliding window handled in ModelConfig).
    "mistral": Family(qkv_bias=False, o_bias=False, mlp_bias=False),
    # Qwen2 / Qwen2.5: biases on q/k/v only.
    "qwen2": Family(qkv_bias=True, o_bias=False, mlp_bias=False),
}

ROPE_TYPES = ("default", "llama3")
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # one of ROPE_TYPES
    # llama3 scaling (Llama 3.1+): low frequencies divided by `factor`, a smooth ramp between the two wavelengths.
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ROPE_TYPES:
            raise ConfigError(f"unsupported RoPE scaling type {self.kind!r} (supported: {', '.join(ROPE_TYPES)})")
        if self.theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.theta}")
        if self.kind == "llama3" and not (self.factor > 0 and self.high_freq_factor > self.low_freq_factor > 0):
            raise ConfigError("llama3 RoPE scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0")


@dataclass(frozen=True)
class QuantConfig:
    """AWQ weight-only quantization in the AutoAWQ GEMM layout (see tinyserve_kernels/layout.py)."""

    bits: int
    group_size: int
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self):
        if self.bits not in (3, 4):
            raise ConfigError(f"unsupported quantization bits {self.bits} (supported: 4, and 3 stored in 4-bit containers)")
        if self.version != "gemm":
            raise ConfigError(f"unsupported AWQ packing version {self.version!r} (supported: gemm)")
        if not self.zero_point:
            raise ConfigError("AWQ checkpoints without zero points are not supported (zero_point must be true)")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"invalid quantization group size {self.group_size}")

    def is_quantized(self, module: str) -> bool:
        """AutoAWQ's rule: a linear is left in float when any entry of modules_to_not_convert is a substring of it."""
        return not any(skip in module for skip in self.modules_to_not_convert)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "QuantConfig":
        method = str(d.get("quant_method", "awq")).lower()
        if method != "awq":
            raise ConfigError(f"{source}: unsupported quantization method {method!r} (supported: awq)")
        try:
            bits = int(d.get("bits", d.get("w_bit", 4)))
            group_size = int(d.get("group_size", d.get("q_group_size", 128)))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: bad bits or group_size in the quantization config: {e}") from None
        return cls(
            bits=bits,
            group_size=group_size,
            zero_point=bool(d.get("zero_point", True)),
            version=str(d.get("version", "gemm")).lower(),
            modules_to_not_convert=tuple(d.get("modules_to_not_convert") or ()),
        )


@dataclass(frozen=True)
class ModelConfig:
    family: str  # key of FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # attention window; sequences longer than this are refused
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    checkpoint_dtype: str = "float16"
    quant: QuantConfig | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"config.json: num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context(self) -> int:
        """The longest sequence the model can attend over correctly."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict, quant: QuantConfig | None = None) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            supported = ", ".join(sorted(FAMILIES))
            raise ConfigError(f"config.json: unsupported model_type {model_type!r} (supported: {supported})")
        fam = FAMILIES[model_type]
        archs = d.get("architectures") or []
        if archs and not any(a.endswith("ForCausalLM") for a in archs):
            raise ConfigError(f"config.json: architectures {archs} is not a causal language model")

        def need(key: str):
            if key not in d or d[key] is None:
                raise ConfigError(f"config.json: missing {key!r}")
            return d[key]

        try:
            hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
            cfg = cls(
                family=model_type,
                vocab_size=int(need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(need("intermediate_size")),
                num_layers=int(need("num_hidden_layers")),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rope=_rope_from_dict(d),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=bool(d.get("attention_bias", False)) if fam.qkv_bias is None else fam.qkv_bias,
                o_bias=bool(d.get("attention_bias", False)) if fam.o_bias is None else fam.o_bias,
                mlp_bias=bool(d.get("mlp_bias", False)) if fam.mlp_bias is None else fam.mlp_bias,
                sliding_window=_sliding_window(d, model_type),
                eos_token_ids=_as_ids(d.get("eos_token_id")),
                bos_token_id=d.get("bos_token_id"),
                checkpoint_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float16"),
                quant=quant,
                extra=d,
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json: malformed value: {e}") from None
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"config.json: unsupported hidden_act {d['hidden_act']!r} (supported: silu)")
        return cfg

    @classmethod
    def load(cls, folder: str | Path) -> "ModelConfig":
        folder = Path(folder)
        path = folder / "config.json"
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder")
        if not path.is_file():
            raise ConfigError(f"{folder} has no config.json (is it a Hugging Face model folder?)")
        d = _read_json(path)
        quant = None
        if d.get("quantization_config"):
            quant = QuantConfig.from_dict(d["quantization_config"], "config.json")
        elif (folder / "quant_config.json").is_file():
            quant = QuantConfig.from_dict(_read_json(folder / "quant_config.json"), "quant_config.json")
        cfg = cls.from_dict(d, quant)
        gen = folder / "generation_config.json"
        if gen.is_file():
            extra_eos = _as_ids(_read_json(gen).get("eos_token_id"))
            cfg = replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + extra_eos)))
        return cfg


def _rope_from_dict(d: dict) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs use `rope_theta` plus an
    # optional `rope_scaling` dict whose type key is `rope_type` or the legacy `type`.
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind != "llama3":
        return RopeConfig(theta=theta, kind=kind)
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ConfigError(f"config.json: llama3 RoPE scaling is missing {', '.join(missing)}")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192))),
    )


def _sliding_window(d: dict, model_type: str) -> int | None:
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _as_ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return d
