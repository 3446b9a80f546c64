"""The quantization methods by name: one entry point used by `python -m tinyserve_quantize` and `python -m tinyserve_quantize.compare`.

- rtn: round to nearest (each group's min and max); no calibration.
- awq: activation-aware scales and clipping (awq.py).
- gptq: GPTQ's error-feedback rounding against each linear's input Hessian (gptq.py).
- awq-gptq: AWQ's scales folded in first, then GPTQ's rounding of the scaled weights (gptq.py).
All four write the same groups and grid (quantizer.py), so their results pack into the same layout.
"""

from collections.abc import Callable

import torch
from torch import nn

from tinyserve_quantize.awq import QuantResult, SearchConfig, awq_quantize, rtn_quantize
from tinyserve_quantize.gptq import GPTQConfig, gptq_quantize
from tinyserve_quantize.model_families import Family
from tinyserve_quantize.quantizer import QuantSpec

METHODS = ("rtn", "awq", "gptq", "awq-gptq")
CALIBRATED = ("awq", "gptq", "awq-gptq")


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
) -> QuantResult:
    """Quantize every decoder linear of the fp32 model (modified in place) with `method`; windows [B, S] token ids
    (unused by rtn)."""
    if method == "rtn":
        return rtn_quantize(model, family, spec, progress)
    if method == "awq":
        return awq_quantize(model, family, spec, windows, search, progress, log)
    if method == "gptq":
        return gptq_quantize(model, family, spec, windows, gptq, search, False, progress, log)
    if method == "awq-gptq":
        return gptq_quantize(model, family, spec, windows, gptq, search, True, progress, log)
    raise ValueError(f"method {method!r}; choose one of {list(METHODS)}")
