"""Shared fixtures: the real default model (fp16 folder) and tiny random-weight Llama / Qwen2 folders.

The tiny models borrow the default model's tokenizer (so chat templates, EOS and detokenization are real) and have
shapes chosen to be awkward: hidden 192 (not a power of two), GQA, group sizes 32 and 64 both divide every K.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

# Triton kernels run through the interpreter when there is no GPU; the flag is read when kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="session")
def default_fp16_dir() -> Path:
    from tinyserve_quantize.default_model import ensure_fp16_default

    return ensure_fp16_default()


def tiny_config(arch: str, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        # Larger than the 0.02 default so that logits are not all near-ties (greedy comparisons stay meaningful).
        initializer_range=0.08,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0)
    raise ValueError(arch)


def make_tiny_model(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random-weight fp16 HF folder of the given family, with the default model's tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=49152)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Give the norms non-trivial weights so folding scales into them is really exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(torch.float16).save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_fp16_dir) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), default_fp16_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, default_fp16_dir) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), default_fp16_dir)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tiny_llama_dir, tiny_qwen2_dir) -> Path:
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[request.param]


@pytest.fixture(scope="session")
def tiny_int4_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model of each family with every decoder linear round-to-nearest INT4 (group 32), AWQ GEMM layout."""
    from runtime_helpers import write_rtn_folder

    return write_rtn_folder(tiny_model_dir, tmp_path_factory.mktemp(f"{tiny_model_dir.name}-int4"), group_size=32)
