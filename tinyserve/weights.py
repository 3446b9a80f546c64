"""Load a Hugging Face folder's safetensors into `model.ModelWeights` on a device, as the file stores them.

Reads single-file and sharded (`model.safetensors.index.json`) checkpoints, float (fp16/bf16/fp32) and AWQ INT4
(AutoAWQ GEMM layout: `*.qweight`, `*.qzeros`, `*.scales` per linear, kept packed as `model.PackedLinear`; the
backend converts them for its kernels). q/k/v and gate/up are fused into one linear each by concatenating along N.
Never unpickles anything: `.bin`/`.pt` checkpoints are refused.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from tinyserve.config import ModelConfig
from tinyserve.model import DenseLinear, LayerWeights, Linear, ModelWeights, PackedLinear
from tinyserve_kernels.checkpoint import Checkpoint
from tinyserve_kernels.layout import PACK_FACTOR, check_shapes, dequantize


class WeightsError(ValueError):
    """A tensor is missing, has the wrong shape, or the folder has no usable weights. One line for the user."""


@dataclass
class _Part:
    """One linear as stored: either packed INT4 (file layout) or a float weight, plus an optional bias."""

    weight: torch.Tensor | None = None  # [N, K] float
    qweight: torch.Tensor | None = None  # [K, N // 8] int32
    qzeros: torch.Tensor | None = None  # [K // G, N // 8] int32
    scales: torch.Tensor | None = None  # [K // G, N] fp16
    group_size: int = 0
    bias: torch.Tensor | None = None  # [N]

    def dense(self) -> torch.Tensor:
        """[N, K] fp32, dequantizing when packed."""
        if self.weight is not None:
            return self.weight.float()
        return dequantize(self.qweight, self.qzeros, self.scales, self.group_size).float().t()


class Loader:
    def __init__(self, folder: str | Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.ck = Checkpoint(folder, WeightsError)
        self.cfg, self.device, self.dtype = cfg, device, dtype

    def part(self, name: str, k: int, n: int, bias: bool) -> _Part:
        """Read linear `name` (K = in_features, N = out_features) in whichever form the checkpoint has it."""
        ck, quant = self.ck, self.cfg.quant
        b = ck.get(f"{name}.bias", (n,)) if bias else None
        if ck.has(f"{name}.qweight"):
            if quant is None:
                raise WeightsError(f"{name} is packed INT4 but config.json has no quantization_config")
            G = k if quant.group_size == -1 else quant.group_size
            if k % G:
                raise WeightsError(f"{name}: group size {G} does not divide in_features {k}")
            p = _Part(
                qweight=ck.get(f"{name}.qweight", (k, n // PACK_FACTOR)),
                qzeros=ck.get(f"{name}.qzeros", (k // G, n // PACK_FACTOR), "AWQ GEMM checkpoints store zero points"),
                scales=ck.get(f"{name}.scales", (k // G, n)),
                group_size=G,
                bias=b,
            )
            try:
                check_shapes(p.qweight, p.qzeros, p.scales, G, name)
            except ValueError as e:
                raise WeightsError(str(e)) from None
            return p
        if ck.has(f"{name}.weight"):
            return _Part(weight=ck.get(f"{name}.weight", (n, k)), bias=b)
        expect = "qweight" if quant is not None and quant.is_quantized(name) else "weight"
        raise WeightsError(f"missing tensor {name}.{expect} in {ck.folder}")

    def fused(self, parts: list[_Part]) -> Linear:
        """Concatenate parts along N into one linear: packed when all are packed with one group size, else float."""
        bias = None
        if any(p.bias is not None for p in parts):
            bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p_n(p)) for p in parts]).to(self.device, self.dtype)
        if all(p.qweight is not None for p in parts) and len({p.group_size for p in parts}) == 1:
            qweight = torch.cat([p.qweight for p in parts], dim=1).to(self.device)
            qzeros = torch.cat([p.qzeros for p in parts], dim=1).to(self.device)
            scales = torch.cat([p.scales for p in parts], dim=1).to(self.device)
            return PackedLinear(qweight, qzeros, scales, parts[0].group_size, bias)
        if all(p.weight is not None for p in parts):
            weight = torch.cat([p.weight for p in parts], dim=0)
        else:
            weight = torch.cat([p.dense() for p in parts], dim=0)  # mixed packed/float parts: serve them as float
        return DenseLinear(weight.to(self.device, self.dtype).contiguous(), bias)

    def vector(self, name: str, n: int) -> torch.Tensor:
        return self.ck.get(name, (n,)).to(self.device, self.dtype)

    def load(self) -> ModelWeights:
        c = self.cfg
        H, I, q, kv = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size
        layers = []
        for i in range(c.num_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            qkv = [self.part(f"{a}.q_proj", H, q, c.qkv_bias), self.part(f"{a}.k_proj", H, kv, c.qkv_bias), self.part(f"{a}.v_proj", H, kv, c.qkv_bias)]
            gate_up = [self.part(f"{m}.gate_proj", H, I, c.mlp_bias), self.part(f"{m}.up_proj", H, I, c.mlp_bias)]
            layers.append(
                LayerWeights(
                    attn_norm=self.vector(f"model.layers.{i}.input_layernorm.weight", H),
                    qkv=self.fused(qkv),
                    o=self.fused([self.part(f"{a}.o_proj", q, H, c.o_bias)]),
                    mlp_norm=self.vector(f"model.layers.{i}.post_attention_layernorm.weight", H),
                    gate_up=self.fused(gate_up),
                    down=self.fused([self.part(f"{m}.down_proj", I, H, c.mlp_bias)]),
                )
            )
        embed = self.ck.get("model.embed_tokens.weight", (c.vocab_size, H)).to(self.device, self.dtype)
        if c.tie_word_embeddings and not (self.ck.has("lm_head.weight") or self.ck.has("lm_head.qweight")):
            head: Linear = DenseLinear(embed)
        elif not c.tie_word_embeddings and not (self.ck.has("lm_head.weight") or self.ck.has("lm_head.qweight")):
            raise WeightsError(f"missing tensor lm_head.weight in {self.ck.folder} (config.json says the embeddings are not tied)")
        else:
            head = self.fused([self.part("lm_head", H, c.vocab_size, False)])
        weights = ModelWeights(embed=embed, layers=layers, norm=self.vector("model.norm.weight", H), lm_head=head)
        self.ck.close()
        return weights


def p_n(p: _Part) -> int:
    """N (out_features) of a part."""
    return p.weight.shape[0] if p.weight is not None else p.scales.shape[1]


def load_weights(folder: str | Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> ModelWeights:
    return Loader(folder, cfg, device, dtype).load()
