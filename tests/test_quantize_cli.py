"""The command line's error paths: each user mistake is one line naming the problem, never a traceback, and nothing
is written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinyserve_quantize.__main__ import parse_args
from tinyserve_quantize.pipeline import USER_ERRORS, run

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def quantize(*args: str):
    return run(parse_args(list(args)), log=lambda m: None, progress=False)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    r = cli("tinyserve_quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"quantize: error: model folder {tmp_path / 'missing'} does not exist"
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_error_is_one_line(tmp_path):
    r = cli("tinyserve_quantize.evaluate", "--model", str(tmp_path), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"tinyserve_quantize.evaluate: error: {tmp_path} has no config.json (not a Hugging Face model folder)"


def _copy(src: Path, dst: Path, config_edit=None) -> Path:
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_malformed_config(tmp_path, tiny_llama_dir):
    bad = _copy(tiny_llama_dir, tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(USER_ERRORS, match=r"config.json is not valid JSON"):
        quantize("--model", str(bad), "--out", str(tmp_path / "out"))


def test_unknown_architecture_lists_supported(tmp_path, tiny_llama_dir):
    def gpt2(cfg):
        cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])

    bad = _copy(tiny_llama_dir, tmp_path / "gpt2", gpt2)
    with pytest.raises(USER_ERRORS, match=r"unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM .*Qwen2ForCausalLM"):
        quantize("--model", str(bad), "--out", str(tmp_path / "out"))


def test_unsupported_dtype(tmp_path, tiny_llama_dir):
    bad = _copy(tiny_llama_dir, tmp_path / "f8", lambda cfg: cfg.update(dtype="float8_e4m3fn"))
    with pytest.raises(USER_ERRORS, match=r"unsupported dtype 'float8_e4m3fn'; supported: float16, bfloat16, float32"):
        quantize("--model", str(bad), "--out", str(tmp_path / "out"))


def test_pickle_only_folder_is_refused(tmp_path, tiny_llama_dir):
    bad = _copy(tiny_llama_dir, tmp_path / "pickle")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(USER_ERRORS, match=r"only pickle weights"):
        quantize("--model", str(bad), "--out", str(tmp_path / "out"))


def test_refuses_to_overwrite_and_to_requantize(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(USER_ERRORS, match=r"already exists; pass --overwrite"):
        quantize("--model", str(tiny_llama_dir), "--out", str(out), "--method", "rtn")
    assert (out / "keep.txt").read_text() == "mine"
    quantize("--model", str(tiny_llama_dir), "--out", str(out), "--method", "rtn", "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(USER_ERRORS, match=r"already quantized"):
        quantize("--model", str(out), "--out", str(tmp_path / "again"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_group_size_not_dividing_names_the_layer(tmp_path, tiny_llama_dir):
    # The tiny model's hidden size is 192: 128 does not divide it. The error comes before any calibration.
    with pytest.raises(USER_ERRORS, match=r"model\.layers\.0\.self_attn\.q_proj: group size 128 does not divide in_features 192"):
        quantize("--model", str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--group-size", "128")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "gptx"], r"method 'gptx'; choose one of \['rtn', 'awq', 'gptq', 'awq-gptq', 'awq-gptq-attn'\]"),
        (["--method", "gptq", "--percdamp", "2"], r"percdamp 2.0 must lie in \[0, 1\)"),
        (["--method", "gptq", "--calib-inputs", "float"], r"calibration inputs 'float'; choose one of \['quantized', 'fp'\]"),
        (["--w-bit", "8"], r"w-bit 8 is not supported"),
        (["--group-size", "100"], r"group size 100 is not supported"),
        (["--clip-mode", "wide"], r"clip mode 'wide'"),
        (["--n-samples", "0"], r"--n-samples must be at least 1"),
    ],
)
def test_bad_settings(tmp_path, args, message):
    with pytest.raises(USER_ERRORS, match=message):
        parse_args(["--model", str(tmp_path), "--out", str(tmp_path / "out"), *args])


def test_missing_calibration_file(tmp_path, tiny_llama_dir):
    with pytest.raises(USER_ERRORS, match=r"calibration text .*nope.txt does not exist"):
        quantize("--model", str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--calib-text", str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("content,message", [
    (b"caf\xe9 au lait", r"is not UTF-8 text \(byte 3: b'\\xe9'\); convert it first"),  # Latin-1, not UTF-8
    (b" \n\t\n", "is empty"),
    (None, "is not a regular file"),  # a folder
])
def test_unusable_calibration_text(tmp_path, tiny_llama_dir, content, message):
    # Decoding leniently would silently calibrate on other text than the file's: each case is one clear error.
    path = tmp_path / "calib.txt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(USER_ERRORS, match=rf"calibration text .*calib.txt {message}"):
        quantize("--model", str(tiny_llama_dir), "--out", str(tmp_path / "out"), "--calib-text", str(path))
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_refuses_non_utf8_text(tmp_path, tiny_llama_dir):
    text = tmp_path / "latin1.txt"
    text.write_bytes("Ein Märchen über Bäume.".encode("latin-1"))
    r = cli("tinyserve_quantize.evaluate", "--model", str(tiny_llama_dir), "--text", str(text))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"tinyserve_quantize.evaluate: error: text file {text} is not UTF-8 text (byte 5: b'\\xe4'); "
                                "convert it first, e.g. iconv -f latin1 -t utf-8")


def test_table_rejects_an_unknown_recipe_in_one_line():
    r = cli("tinyserve_quantize.table", "--recipes", "awq-w4-g16")
    assert r.returncode == 1
    assert r.stderr.startswith("tinyserve_quantize.table: error: unknown recipe 'awq-w4-g16'; choose from default, all, ")
    assert "Traceback" not in r.stderr
