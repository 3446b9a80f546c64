"""The command line's model folders: --model DIR, or the embedded default model (tinyserve_quantize/recipes.py names
its folders). A missing default folder is built by the quantizer in a child process, `python -m
tinyserve_quantize.default_model`, whose progress shows on stderr: the runtime never imports the quantizer."""

import subprocess
import sys
from pathlib import Path

from tinyserve_quantize.recipes import fp16_folder, is_complete, quantized_folder


class ModelFolderError(ValueError):
    """The model folder does not exist or the default model could not be built. One line for the user."""


def resolve_model(model: str | None) -> Path:
    """--model DIR, or the default model quantized by the default recipe, built and cached on first use."""
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelFolderError(f"--model {model}: no such folder")
        return path
    return default_folder("quantized")


def default_folder(kind: str) -> Path:
    """The default model's "quantized" or "fp16" folder, building it if it is not complete yet."""
    folder = quantized_folder() if kind == "quantized" else fp16_folder()
    if is_complete(folder):
        return folder
    proc = subprocess.run([sys.executable, "-m", "tinyserve_quantize.default_model", kind], stdout=subprocess.PIPE, text=True)
    if proc.returncode == 130:
        raise KeyboardInterrupt
    if proc.returncode != 0:
        raise ModelFolderError(f"the default model's {kind} folder could not be built (see the message above)")
    return Path(proc.stdout.strip().splitlines()[-1])
