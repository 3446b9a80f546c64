"""The default model's recipes and cache folders: what `python -m tinyserve` runs by default and where it lives.

Standard library only, so the runtime's command line can name the folders without importing the quantizer; building
them (GGUF conversion, quantization) is tinyserve_quantize/default_model.py's job.
"""

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NAME = "SmolLM2-135M-Instruct"
# Part of every cached quantized folder's name. Bump it whenever the quantizer's arithmetic changes what a recipe
# writes, so that a cache built by an older version is rebuilt instead of served (the golden test's ids depend on it).
RECIPE_VERSION = 6


@dataclass(frozen=True)
class Recipe:
    """One way to quantize the default model: the `python -m tinyserve_quantize` settings that differ from its
    defaults. BENCHMARKS.md, "The default recipe", measures every candidate."""

    method: str
    group_size: int
    n_samples: int = 128  # calibration windows of 512 tokens asked for (the built-in text holds 84)
    calib_inputs: str = "quantized"  # gptq / awq-gptq: GPTQConfig.calib_inputs

    @property
    def name(self) -> str:
        calib = "" if self.method == "rtn" else f"-n{min(self.n_samples, CALIB_WINDOWS)}"
        inputs = "-fp-inputs" if "gptq" in self.method and self.calib_inputs == "fp" else ""
        return f"{self.method}-w4-g{self.group_size}{calib}{inputs}"


CALIB_WINDOWS = 84  # windows of 512 tokens in the built-in calibration text (text_data.calib_text)
# The candidates `python -m tinyserve_quantize.table` measures; the source GGUF stores blocks of 32, and the hidden
# size 576 is not a multiple of 128, so the group sizes are 64 and 32.
RECIPES = {
    r.name: r
    for r in (
        Recipe("rtn", 64),
        Recipe("rtn", 32),
        Recipe("awq", 64),  # the default until 2026-12-06
        Recipe("awq-gptq", 64, 32, "fp"),
        Recipe("awq-gptq", 32, 32),
        Recipe("awq-gptq", 32, 32, "fp"),
        Recipe("awq-gptq", 32, 48, "fp"),
        Recipe("awq-gptq", 32, 128, "fp"),
        Recipe("awq-gptq-attn", 32, 48, "fp"),
    )
}
# Best on quality (held-out perplexity and chat agreement) of the candidates that quantize within the first-run
# budget (3 minutes in all, on 2 cores without AMX): BENCHMARKS.md, "The default recipe".
DEFAULT_RECIPE = RECIPES["awq-gptq-w4-g32-n48-fp-inputs"]


def tinyserve_home() -> Path:
    return Path(os.environ.get("TINYSERVE_HOME") or Path.home() / ".cache" / "tinyserve")


def fp16_folder() -> Path:
    return tinyserve_home() / "models" / f"{DEFAULT_NAME}-fp16"


def quantized_folder(recipe: Recipe = DEFAULT_RECIPE) -> Path:
    return tinyserve_home() / "models" / f"{DEFAULT_NAME}-{recipe.name}-r{RECIPE_VERSION}"


def is_complete(folder: Path) -> bool:
    """Whether a default-model folder was fully written (folders are written under a temporary name, then renamed):
    config.json and the weights, one file or an index of shards."""
    weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return (folder / "config.json").is_file() and weights
