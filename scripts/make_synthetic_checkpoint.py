"""Write a Llama-shaped Hugging Face folder with random fp16 weights, to test the quantizer and the runtime at
real-model scale without downloading a model (issue 17).

    python scripts/make_synthetic_checkpoint.py OUT --preset llama2-7b [--layers N] [--seed 0] [--shard-gb 2] [--force]

The tokenizer (and so the vocabulary, 49152) is the embedded default model's, so calibration text tokenizes in range.
Weights are seeded per tensor name (the same seed gives the same bytes, whatever --shard-gb or --layers), linears drawn
from N(0, 1/in_features) so each linear keeps its input's scale (32 layers: residual std about 5, logits std about 1,
finite in fp16), norms 1. Tensors are generated one at a
time and written shard by shard (transformers' names and index), so memory stays about one shard; everything goes to a
temporary folder next to OUT that is renamed into place at the end.
"""

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tinyserve_quantize.default_model import DefaultModelError, ensure_fp16_default

# Files taken from the default model's fp16 folder when it has them (it has no special_tokens_map.json today).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
EMBED_STD = 0.02  # HF's initializer_range; RMSNorm rescales it before the first block
GB = 10**9  # transformers' "2GB" max_shard_size is decimal


class UserError(Exception):
    """A mistake in the command line; reported as one line on stderr, exit code 2."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


PRESETS: dict[str, Shape] = {
    "llama2-7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    # For the quantizer's memory test: peak memory of 24 layers against 2.
    "tiny-2": Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
    "tiny-24": Shape(hidden=64, intermediate=128, layers=24, heads=4, kv_heads=2),
}


@dataclass(frozen=True)
class Args:
    out: Path
    preset: str
    layers: int | None
    seed: int
    shard_gb: float
    force: bool


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    std: float | None  # None: a norm weight, all ones

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # fp16


def tensor_plan(s: Shape, vocab: int) -> list[Tensor]:
    """Every tensor in state_dict order, with its [out_features, in_features] shape and init std."""
    head_dim = s.hidden // s.heads
    q, kv = s.heads * head_dim, s.kv_heads * head_dim

    def linear(name: str, out_f: int, in_f: int) -> Tensor:
        return Tensor(name, (out_f, in_f), 1 / math.sqrt(in_f))

    plan = [Tensor("model.embed_tokens.weight", (vocab, s.hidden), EMBED_STD)]
    for i in range(s.layers):
        p = f"model.layers.{i}"
        plan += [
            linear(f"{p}.self_attn.q_proj.weight", q, s.hidden),
            linear(f"{p}.self_attn.k_proj.weight", kv, s.hidden),
            linear(f"{p}.self_attn.v_proj.weight", kv, s.hidden),
            linear(f"{p}.self_attn.o_proj.weight", s.hidden, q),
            linear(f"{p}.mlp.gate_proj.weight", s.intermediate, s.hidden),
            linear(f"{p}.mlp.up_proj.weight", s.intermediate, s.hidden),
            linear(f"{p}.mlp.down_proj.weight", s.hidden, s.intermediate),
            Tensor(f"{p}.input_layernorm.weight", (s.hidden,), None),
            Tensor(f"{p}.post_attention_layernorm.weight", (s.hidden,), None),
        ]
    plan += [Tensor("model.norm.weight", (s.hidden,), None), linear("lm_head.weight", vocab, s.hidden)]
    return plan


def shard_plan(plan: list[Tensor], max_bytes: int) -> list[list[Tensor]]:
    """transformers' greedy rule: start a new shard when the next tensor would overflow this one; a tensor larger than
    the limit gets a shard of its own."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def make_tensor(t: Tensor, seed: int) -> torch.Tensor:
    if t.std is None:
        return torch.ones(t.shape, dtype=torch.float16)
    # Seeded by (seed, name): a tensor's bytes do not depend on the shard size or on how many layers come before it.
    digest = hashlib.sha256(f"{seed}:{t.name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(t.shape, dtype=torch.float16).normal_(0.0, t.std, generator=g)  # drawn in fp32, stored fp16


def special_ids(src: Path) -> dict[str, int]:
    """bos/eos/pad ids: the tokenizer_config.json's special tokens, looked up in tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    ids = {}
    for key in ("bos", "eos", "pad"):
        token = cfg.get(f"{key}_token")
        if isinstance(token, dict):  # an AddedToken written out in full
            token = token.get("content")
        if token is not None and tok.token_to_id(token) is not None:
            ids[f"{key}_token_id"] = tok.token_to_id(token)
    return ids


def hf_config(s: Shape, vocab: int, ids: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.hidden // s.heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "initializer_range": EMBED_STD,
        "use_cache": True,
        **ids,
    }


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it")


def write_checkpoint(a: Args, shape: Shape, src: Path, tmp: Path) -> tuple[int, int, int]:
    """Write the whole folder into `tmp`; returns (parameters, bytes of weights, shards)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    (tmp / "config.json").write_text(json.dumps(hf_config(shape, vocab, special_ids(src)), indent=2) + "\n")
    (tmp / "SOURCE").write_text(
        f"synthetic random weights (preset {a.preset}, {shape.layers} layers, seed {a.seed}) written by "
        f"scripts/make_synthetic_checkpoint.py; tokenizer from {src.name}\n")

    plan = tensor_plan(shape, vocab)
    shards = shard_plan(plan, int(a.shard_gb * GB))
    total = sum(t.nbytes for t in plan)
    free = shutil.disk_usage(tmp).free
    if free < total:
        raise UserError(f"{tmp.parent} has {free / GB:.1f} GB free; the checkpoint needs {total / GB:.1f} GB")
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    bar = tqdm(total=len(plan), unit="tensor", desc=a.out.name)
    for file, shard in zip(files, shards):
        tensors = {}
        for t in shard:
            tensors[t.name] = make_tensor(t, a.seed)
            bar.update()
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors  # the next shard is generated only after this one is freed
    bar.close()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {t.name: f for f, s in zip(files, shards) for t in s}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sum(math.prod(t.shape) for t in plan), total, n


def readable(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and safetensors writes 0600: give both the modes the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def main(a: Args) -> None:
    start = time.perf_counter()
    shape = PRESETS[a.preset]
    if a.layers is not None:
        if a.layers <= 0:
            raise UserError(f"--layers must be positive, got {a.layers}")
        shape = Shape(shape.hidden, shape.intermediate, a.layers, shape.heads, shape.kv_heads)
    if a.shard_gb <= 0:
        raise UserError(f"--shard-gb must be positive, got {a.shard_gb}")
    check_output(a.out, a.force)
    src = ensure_fp16_default()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=a.out.parent, prefix=f".{a.out.name}.tmp-"))
    try:
        params, nbytes, n = write_checkpoint(a, shape, src, tmp)
        readable(tmp)
        if a.out.exists():  # empty, or --force: move the old folder aside, then the new one in
            old = Path(tempfile.mkdtemp(dir=a.out.parent, prefix=f".{a.out.name}.old-"))
            a.out.rename(old / "x")
            tmp.rename(a.out)
            shutil.rmtree(old)
        else:
            tmp.rename(a.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"wrote {a.out}: preset {a.preset}, {shape.layers} layers, {params:,} parameters, {nbytes:,} bytes "
          f"({nbytes / GB:.2f} GB) in {n} shard{'s' if n > 1 else ''}; wall {time.perf_counter() - start:.1f} s, "
          f"peak RSS {rss / 2**30:.2f} GiB")


def parse_args(argv: list[str] | None = None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder to write")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard in GB (10^9 bytes; default 2)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    ns = p.parse_args(argv)
    return Args(out=ns.out, preset=ns.preset, layers=ns.layers, seed=ns.seed, shard_gb=ns.shard_gb, force=ns.force)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (UserError, DefaultModelError) as e:
        print(f"make_synthetic_checkpoint: error: {e}", file=sys.stderr)
        sys.exit(2)
