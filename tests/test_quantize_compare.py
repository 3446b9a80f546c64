"""`python -m tinyserve_quantize.compare` end to end on the tiny random-weight Llama and Qwen2: the table, the JSON and the PNG,
numbers that agree with the pieces they come from, a failing method as a row, and usage errors before any work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyserve_quantize.awq import dequantize_into
from tinyserve_quantize.methods import quantize_model
from tinyserve_quantize.compare import CompareConfig, main, parse_args
from tinyserve_quantize.evaluate import perplexity, text_ids
from tinyserve_quantize.model_families import family_for
from tinyserve_quantize.model_io import load_model, load_tokenizer, read_config
from tinyserve_quantize.quantizer import QuantSpec
from tinyserve_quantize.text_data import calib_text, eval_text

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(n_samples=8, seqlen=64, ctx=64, max_tokens=256)


def test_all_methods_on_tiny_llama(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "cmp"
    messages = []
    second = tmp_path / "second.txt"
    second.write_text(calib_text()[:4000])
    result = main(CompareConfig(tiny_llama_dir, out=out, also_texts=(second,), **QUICK), log=messages.append)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["fp16", "rtn", "gptq", "awq", "awq-gptq", "awq-gptq-attn"]
    assert all(r["error"] is None for r in rows.values()), [r.get("error") for r in rows.values()]
    assert result["tokens"] == 4 * 63
    assert rows["fp16"]["delta_fp16"] == 0 and rows["fp16"]["quantize_seconds"] is None
    assert rows["rtn"]["rtn_recovered"] == 0
    for m in ("gptq", "awq", "awq-gptq", "awq-gptq-attn"):
        r, a, rtn, fp16 = rows[m], rows[m]["also"][0], rows["rtn"]["also"][0], rows["fp16"]["also"][0]
        assert r["quantize_seconds"] > 0 and r["peak_rss_gib"] > 0.1
        assert r["rtn_recovered"] == pytest.approx((rows["rtn"]["ppl"] - r["ppl"]) / (rows["rtn"]["ppl"] - rows["fp16"]["ppl"]))
        assert a["tokens"] == 4 * 63 and a["ppl"] != r["ppl"]
        assert a["rtn_recovered"] == pytest.approx((rtn["ppl"] - a["ppl"]) / (rtn["ppl"] - fp16["ppl"]))
    # The RTN row is exactly RTN's fake-quantized model on the same tokens.
    model = load_model(tiny_llama_dir)
    dequantize_into(model, quantize_model("rtn", model, family_for(read_config(tiny_llama_dir)), QuantSpec(4, 64), None, progress=False), 64)
    ids = text_ids(load_tokenizer(tiny_llama_dir), eval_text(), 256)
    assert rows["rtn"]["ppl"] == pytest.approx(perplexity(model, ids, 64)[0], rel=1e-6)

    table = capsys.readouterr().out
    assert ("| method | perplexity | vs fp16 | RTN's loss recovered | second.txt perplexity | recovered | quantize s | "
            "peak RSS GiB |") in table
    assert table.count("\n| ") == 1 + 6  # the separator row does not start with "| "
    assert json.loads((out / "compare.json").read_text())["rows"] == result["rows"]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("[3/6] gptq" in m for m in messages)


def test_failing_method_is_a_row_on_tiny_qwen2(tmp_path, tiny_qwen2_dir):
    """Calibration text shorter than one window: the calibrated method fails with its one-line error while the
    table, the JSON and the chart still come out with the other rows (through the real command line)."""
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    out = tmp_path / "cmp"
    r = subprocess.run(
        [sys.executable, "-m", "tinyserve_quantize.compare", "--model", str(tiny_qwen2_dir), "--methods", "fp16,rtn,gptq",
         "--calib-text", str(short), "--seqlen", "64", "--ctx", "64", "--max-tokens", "256", "--w-bit", "3",
         "--out", str(out), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    rows = {row["method"]: row for row in result["rows"]}
    assert result["w_bit"] == 3
    assert rows["fp16"]["error"] is None and rows["rtn"]["error"] is None and rows["rtn"]["ppl"] > rows["fp16"]["ppl"] * 0.5
    assert rows["gptq"]["error"].startswith("the calibration text has") and "fewer than one window of 64" in rows["gptq"]["error"]
    assert "Traceback" not in r.stderr and "compare: gptq failed: the calibration text has" in r.stderr
    assert "perplexity" in r.stderr  # the evaluation's progress bar
    assert json.loads((out / "compare.json").read_text())["rows"][2]["error"] == rows["gptq"]["error"]
    assert (out / "compare.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "fp16,gptq,hqq"], "unknown method 'hqq'; choose from fp16,rtn,awq,gptq,awq-gptq"),
        (["--w-bit", "2"], "w-bit 2 is not supported"),
        (["--text", "/nonexistent.txt"], "--text /nonexistent.txt does not exist"),
    ],
)
def test_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_group_size_that_does_not_fit_fails_before_any_method(tmp_path, tiny_llama_dir):
    r = subprocess.run(
        [sys.executable, "-m", "tinyserve_quantize.compare", "--model", str(tiny_llama_dir), "--group-size", "128", "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip().endswith("group size 128 does not divide in_features 192; use a group size that divides it (or -1)")
    assert not (tmp_path / "o").exists()


def test_title_says_which_methods_calibrate_in_fp32_on_a_bf16_cpu(tmp_path, tiny_llama_dir, monkeypatch):
    """Where bf16 is native, the title names the methods that calibrate in fp32 anyway (awq-gptq-attn)."""
    import torch

    from tinyserve_quantize import compare

    monkeypatch.setattr(compare, "native_compute_dtype", lambda: torch.bfloat16)
    cfg = parse_args(["--model", str(tiny_llama_dir), "--methods", "rtn,awq-gptq-attn", "--out", str(tmp_path / "cmp"),
                      "--n-samples", "4", "--seqlen", "32", "--ctx", "64", "--max-tokens", "128"])
    result = main(cfg, log=lambda m: None)
    assert result["compute_dtype"] == "bfloat16"
    assert result["title"].endswith("calibrated in bfloat16; awq-gptq-attn in float32)")


def test_fp32_flag_calibrates_in_fp32_whatever_the_cpu(tmp_path, tiny_llama_dir):
    """--fp32: the row is the fp32-calibrated model's perplexity (bf16 is the default where the CPU computes it), and
    the JSON and the title say which arithmetic calibrated."""
    import torch

    from tinyserve_quantize.awq import SearchConfig
    from tinyserve_quantize.calibration import calibration_windows

    cfg = parse_args(["--model", str(tiny_llama_dir), "--methods", "awq-gptq", "--fp32", "--out", str(tmp_path / "cmp"),
                      "--n-samples", "8", "--seqlen", "64", "--ctx", "64", "--max-tokens", "256"])
    assert cfg.fp32
    result = main(cfg, log=lambda m: None)
    assert result["compute_dtype"] == "float32" and result["title"].endswith("calibrated in float32)")
    tok = load_tokenizer(tiny_llama_dir)
    model = load_model(tiny_llama_dir)
    windows = calibration_windows(tok, calib_text(), 8, 64)
    out = quantize_model("awq-gptq", model, family_for(read_config(tiny_llama_dir)), QuantSpec(4, 64), windows,
                         SearchConfig(compute_dtype=torch.float32), progress=False)
    dequantize_into(model, out, 64)
    assert result["rows"][0]["ppl"] == pytest.approx(perplexity(model, text_ids(tok, eval_text(), 256), 64)[0], rel=1e-6)
