"""Reading model folders: validation with one-line errors, and loading as an fp32 transformers model.

Only safetensors weights are read (never pickled .bin files). A folder whose config.json carries our
quantization_config (quant_method "awq", version "gemm") is dequantized with tinyserve_kernels.layout's reference functions.
"""

import json
from pathlib import Path

import torch

from tinyserve_kernels.layout import dequantize

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")


class ModelFolderError(ValueError):
    """The folder is missing, malformed or of a kind we do not read; the message says which."""


def read_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path} is not a JSON object")
    return config


def weight_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        if any(Path(folder).glob("*.bin")) or any(Path(folder).glob("*.pt")):
            raise ModelFolderError(f"{folder} has only pickle weights (.bin/.pt), which are not loaded; convert them to safetensors")
        raise ModelFolderError(f"{folder} has no .safetensors weights")
    return files


def config_dtype(config: dict) -> str:
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in SUPPORTED_DTYPES:
        raise ModelFolderError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return dtype


def awq_config(config: dict) -> dict | None:
    """The quantization_config when it is ours to read, None for an unquantized folder; other methods are errors."""
    q = config.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "awq" or str(q.get("version", "gemm")).lower() != "gemm" or not q.get("zero_point", True):
        raise ModelFolderError(f"quantization {q.get('quant_method')!r} (version {q.get('version')!r}) is not supported; only AWQ GEMM with zero points")
    return q


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"cannot load the tokenizer of {folder}: {str(e).splitlines()[0]}") from None


def load_model(folder: Path, attn_implementation: str = "sdpa"):
    """Any supported folder -> fp32 *ForCausalLM in eval mode (packed linears dequantized)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = read_config(folder)
    q = awq_config(config)
    if q is None:
        config_dtype(config)
    files = weight_files(folder)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
        if q is None:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation, use_safetensors=True)
            return model.eval()
        hf_config.quantization_config = None
        if hasattr(hf_config, "_pre_quantization_dtype"):
            del hf_config._pre_quantization_dtype
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFolderError(f"cannot load {folder}: {str(e).splitlines()[0]}") from None
    tensors = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    state = {}
    for key, t in tensors.items():
        if key.endswith(".qweight"):
            prefix = key[: -len(".qweight")]
            try:
                W = dequantize(t, tensors[prefix + ".qzeros"], tensors[prefix + ".scales"], int(q["group_size"]))
            except (KeyError, ValueError) as e:
                raise ModelFolderError(f"{folder}: packed layer {prefix} is malformed: {e}") from None
            state[prefix + ".weight"] = W.float().t()  # [K, N] -> [N, K]
        elif not key.endswith((".qzeros", ".scales")):
            state[key] = t.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelFolderError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()
