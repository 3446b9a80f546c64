"""The quantization methods by name: one entry point for a model in memory, used by `python -m tinyserve_quantize.compare`,
the scripts and the tests (`python -m tinyserve_quantize` streams the checkpoint instead: pipeline.py).

- rtn: round to nearest (each group's min and max); no calibration.
- awq: activation-aware scales and clipping (awq.py), then the gate (clip_gate.py).
- gptq: GPTQ's error-feedback rounding against each linear's input Hessian (gptq.py).
- awq-gptq: AWQ's scales folded in first, then GPTQ's rounding of the scaled weights (gptq.py).
- awq-gptq-attn: awq-gptq whose v_proj rows are rounded against the Gram of the attention-averaged inputs, per
  key/value head (value_stats.py): the error attention actually passes on, not the error on each token's input.
All five write the same groups and grid (quantizer.py), so their results pack into the same layout.
"""

from collections.abc import Callable

import torch
from torch import nn

from tinyserve_quantize.awq import PackedLinear, QuantResult, SearchConfig
from tinyserve_quantize.blocks import LoadedModel
from tinyserve_quantize.blockwise import quantize_blocks
from tinyserve_quantize.gptq import GPTQConfig
from tinyserve_quantize.model_families import Family
from tinyserve_quantize.quantizer import QuantSpec

METHODS = ("rtn", "awq", "gptq", "awq-gptq", "awq-gptq-attn")
CALIBRATED = ("awq", "gptq", "awq-gptq", "awq-gptq-attn")


class ResultSink:
    """Blocks -> a QuantResult's packed linears; parameters the gate changed (a norm set back to its unfolded value)
    are copied into the model, which the export and dequantize_into read."""

    def __init__(self, model: nn.Module):
        self.model, self.linears = model, {}

    def block(self, linears: dict[str, PackedLinear], params: dict[str, torch.Tensor]) -> None:
        self.linears.update(linears)
        for name, v in params.items():
            self.model.get_parameter(name).data.copy_(v)

    def param(self, name: str, tensor: torch.Tensor) -> None:
        pass  # the model holds it


def quantize_model(
    method: str,
    model: nn.Module,
    family: Family,
    spec: QuantSpec,
    windows: torch.Tensor | None,
    search: SearchConfig = SearchConfig(),
    gptq: GPTQConfig = GPTQConfig(),
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> QuantResult:
    """Quantize every decoder linear of the fp32 model (modified in place: scales folded into its norms and linears)
    with `method`; windows [B, S] token ids (unused by rtn). device: where each block is quantized (it goes back to
    the host after)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}; choose one of {list(METHODS)}")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("quantize_model needs the model in fp32 (folding and searching are done in fp32)")
    sink = ResultSink(model)
    outcome = quantize_blocks(method, LoadedModel(model, family), spec, windows, sink, search, gptq, progress, log, device=device)
    return QuantResult(sink.linears, outcome.report, outcome.gate)
