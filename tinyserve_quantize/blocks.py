"""Where the quantizer gets a model's decoder blocks from: a loaded model holds all of them (LoadedModel), a checkpoint
gives one at a time (Checkpointed), so that memory holds one block in fp32, the calibration activations and the
embedding, whatever the model's depth.

Both give a *ForCausalLM `model` whose embedding, rotary tables and final norm are real, so the model itself can run
up to block 0 (calibration.capture_block_inputs) and the gate can apply the final norm; Checkpointed keeps every
decoder block on the meta device except the one loaded, drops the embedding once block 0's inputs are captured
(release_embedding) and reads the head only when the gate asks for it.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from tinyserve_kernels.checkpoint import Checkpoint
from tinyserve_quantize.model_families import Family
from tinyserve_quantize.model_io import ModelFolderError, config_dtype, read_config


class LoadedModel:
    """Blocks of an fp32 model already in memory (quantized in place, as quantize_model's callers expect)."""

    def __init__(self, model: nn.Module, family: Family):
        self.model, self.family = model, family
        self.layers = model.get_submodule(family.layers)
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, i: int) -> nn.Module:
        return self.layers[i]

    def release(self, i: int) -> None:
        pass

    def release_embedding(self) -> None:
        pass

    def head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.detach()  # [V, H]

    def extra_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The parameters outside the decoder blocks (embedding, final norm, untied head), for the export."""
        inside = self.family.layers + "."
        for name, t in self.model.state_dict().items():
            if not name.startswith(inside) and not (self.tied and name == "lm_head.weight"):
                yield name, t


class Checkpointed:
    """Blocks read from a safetensors folder one at a time, in fp32; the others stay on the meta device."""

    def __init__(self, folder: Path, family: Family):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = read_config(folder)
        config_dtype(config)
        try:
            hf_config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as e:
            raise ModelFolderError(f"cannot load {folder}: {str(e).splitlines()[0]}") from None
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.family = family
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.layers = self.model.get_submodule(family.layers)
        # Opened per tensor: a multi-GB shard's pages do not stay resident (streaming.py measured why).
        self.ck = Checkpoint(folder, ModelFolderError, keep_open=False)
        inside = re.compile(re.escape(family.layers) + r"\.\d+\.")
        self.extra = [n for n, _ in self.model.named_parameters() if not inside.match(n) and not (self.tied and n == "lm_head.weight")]
        needed = self.extra + [f"{family.layers}.{i}.{n}" for i in range(len(self.layers)) for n, _ in self.layers[i].named_parameters()]
        missing = [n for n in needed if not self.ck.has(n)]
        if missing:
            raise ModelFolderError(f"{folder} lacks {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""))
        self.embedding = self.model.get_input_embeddings()
        self.head_name = next(n for n, p in self.model.named_parameters() if p is self.model.get_output_embeddings().weight)
        for name, _ in list(self.model.named_parameters()):  # the embedding and the final norm: real, fp32
            if name in self.extra and name != "lm_head.weight":
                self._materialize(self.model, name)
        for mod_name, mod in self.model.named_modules():  # rotary tables are computed, not stored: rebuild them
            if any(b.is_meta for b in mod.buffers(recurse=False)):
                parent, _, attr = mod_name.rpartition(".")
                self.model.get_submodule(parent).register_module(attr, type(mod)(config=self.model.config))

    def _materialize(self, module: nn.Module, name: str, prefix: str = "") -> None:
        owner, _, attr = name.rpartition(".")
        p = module.get_parameter(name)
        t = self.ck.get(prefix + name, tuple(p.shape)).float()
        module.get_submodule(owner).register_parameter(attr, nn.Parameter(t, requires_grad=False))

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, i: int) -> nn.Module:
        block = self.layers[i]
        for name, _ in list(block.named_parameters()):
            self._materialize(block, name, f"{self.family.layers}.{i}.")
        return block

    def release(self, i: int) -> None:
        self.layers[i].to("meta")

    def release_embedding(self) -> None:
        """Once block 0's inputs are captured the embedding is not run again ([V, H] fp32: 0.8 GB on a 7B model)."""
        self.embedding.to("meta")

    def head(self) -> torch.Tensor:
        """[V, H] fp32, read from the checkpoint (the embedding's tensor when tied)."""
        return self.ck.get(self.head_name).float()

    def extra_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.extra:
            yield name, self.ck.get(name).float()
