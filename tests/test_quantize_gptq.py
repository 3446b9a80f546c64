"""GPTQ: reduces to RTN under an identity Hessian, beats it under a correlated one, handles dead channels and
singular Hessians, keeps the RTN/AWQ groups and grid (3-bit included), and writes folders the runtime serves."""

import json

import pytest
import torch

from tinyserve_kernels.layout import dequantize, pack_linear
from tinyserve_quantize.calibration import run_block
from tinyserve_quantize.gptq import GPTQConfig, gptq_block, gptq_weight
from tinyserve_quantize.model_families import FAMILIES
from tinyserve_quantize.model_io import load_model
from tinyserve_quantize.pipeline import QuantizeConfig, run
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec, fake_quantize, quantize_weight
from tests.test_quantize_awq import block_inputs, fake_quantize_block_rtn, tiny_model


def correlated_inputs(T: int, K: int, seed: int, rho: float = 0.9) -> torch.Tensor:
    """[T, K] tokens whose channels follow an AR(1) process along K (neighbours correlate with rho) and have very
    different magnitudes: a known input covariance under which rounding errors can cancel across channels."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(T, K, generator=g)
    x = torch.empty(T, K)
    x[:, 0] = e[:, 0]
    for k in range(1, K):
        x[:, k] = rho * x[:, k - 1] + (1 - rho**2) ** 0.5 * e[:, k]
    gain = torch.linspace(0.2, 3.0, K)[torch.randperm(K, generator=torch.Generator().manual_seed(K))]  # one per K
    return x * gain


def output_mse(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    return float(((X @ (Wq - W).t()) ** 2).mean())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("N,K,G", [(24, 192, 64), (40, 96, 32), (16, 160, -1), (8, 384, 128)])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_rtn_codes(bits, N, K, G, act_order):
    """With H = I no error is fed forward (H^-1's Cholesky factor is diagonal), so GPTQ is RTN exactly."""
    torch.manual_seed(N + K)
    W = torch.randn(N, K) * torch.rand(1, K) * 2
    spec = QuantSpec(bits, G)
    q = gptq_weight(W, torch.eye(K), spec, GPTQConfig(act_order=act_order))
    codes, zeros, scales = quantize_weight(W, spec)
    assert torch.equal(q.codes, codes) and torch.equal(q.zeros, zeros) and torch.equal(q.scales, scales)


@pytest.mark.parametrize("G", [32, 64, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_under_a_known_input_covariance(G, act_order):
    K, N = 192, 48
    X = correlated_inputs(4096, K, seed=0)
    fresh = correlated_inputs(2048, K, seed=1)  # same distribution, tokens GPTQ never saw
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(4, G)
    q = gptq_weight(W, X.t() @ X / len(X), spec, GPTQConfig(act_order=act_order))
    Wq = q.dequantized(spec.group(K))
    rtn, gptq = output_mse(W, fake_quantize(W, spec), fresh), output_mse(W, Wq, fresh)
    assert gptq < 0.7 * rtn, (gptq, rtn)
    # The same per-group grid as RTN: every code on its group's grid, within the container.
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15 and q.scales.shape == (N, K // spec.group(K))


def test_dead_channels_are_rounded_like_rtn_and_do_not_spread_error():
    K, N = 128, 32
    X = correlated_inputs(2048, K, seed=3)
    dead = torch.tensor([0, 5, 64, 127])
    X[:, dead] = 0  # channels never active on the calibration tokens: H has zero rows and columns there
    H = X.t() @ X / len(X)
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(4, 32)
    q = gptq_weight(W, H, spec)
    assert q.dead == len(dead)
    Wq = q.dequantized(32)
    assert torch.isfinite(Wq).all()
    # A dead column is never moved by the error feedback, so it sits within half a step of its original weight.
    step = q.scales.float().repeat_interleave(32, dim=1)
    assert ((Wq - W).abs()[:, dead] <= step[:, dead] * 0.502 + 1e-6).all()
    assert output_mse(W, Wq, X) < 0.7 * output_mse(W, fake_quantize(W, spec), X)


def test_singular_hessian_gets_more_damping():
    """Fewer calibration tokens than channels: H is singular; without damping the factorization fails and is retried
    with more damping instead of producing NaNs."""
    K = 64
    X = torch.randn(16, K)
    W = torch.randn(16, K)
    q = gptq_weight(W, X.t() @ X, QuantSpec(4, 32), GPTQConfig(percdamp=0.0))
    assert q.damp > 0 and torch.isfinite(q.dequantized(32)).all()


def test_group_size_that_does_not_divide_k_is_a_clear_error():
    message = r"model.layers.0.mlp.down_proj: group size 64 does not divide in_features 96"
    with pytest.raises(QuantizationError, match=message):
        gptq_weight(torch.randn(8, 96), torch.eye(96), QuantSpec(4, 64), name="model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("bits", [3, 4])
def test_packed_output_reads_back_through_the_layout_reference(bits):
    K, N, G = 192, 40, 64
    X = correlated_inputs(1024, K, seed=5)
    W = torch.randn(N, K) * 0.05
    q = gptq_weight(W, X.t() @ X, QuantSpec(bits, G))
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    assert int(q.zeros.min()) >= 0 and int(q.zeros.max()) <= 2**bits - 1
    qweight, qzeros, scales = pack_linear(q.codes, q.zeros, q.scales)
    W_file = dequantize(qweight, qzeros, scales, G)  # [K, N] fp16
    torch.testing.assert_close(W_file.t().float(), q.dequantized(G).half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_block_output_error_below_rtn(arch):
    """On a real transformers decoder block with correlated inputs, GPTQ (and AWQ + GPTQ) lower the block's output
    error on fresh inputs well below RTN's."""
    model = tiny_model(arch)
    block, kw = block_inputs(model, torch.zeros(1, 64, 192))
    calib = torch.stack([correlated_inputs(64, 192, seed=10 + b) for b in range(12)])
    fresh = torch.stack([correlated_inputs(64, 192, seed=50 + b) for b in range(4)])
    reference = block(fresh, **kw)
    family, spec = FAMILIES[arch], QuantSpec(4, 64)

    def output_error(method: str) -> float:
        b = tiny_model(arch).model.layers[0]
        if method == "rtn":
            fake_quantize_block_rtn(b, family, spec)
        else:
            sites = {g.linears[0]: b.get_submodule(g.linears[0]) for g in family.groups}
            _, stats = run_block(b, calib, kw, sites, holdout_every=4)
            # b's linears now hold their dequantized weights
            gptq_block(b, 0, family, spec, GPTQConfig(), stats, awq=method == "awq-gptq")
        return float(((b(fresh, **kw) - reference) ** 2).mean())

    rtn = output_error("rtn")
    assert output_error("gptq") < 0.6 * rtn
    assert output_error("awq-gptq") < 0.6 * rtn


@pytest.mark.parametrize("method,bits", [("gptq", 3), ("awq-gptq", 4)])
@torch.inference_mode()
def test_folder_is_served_unchanged_by_the_runtime(tmp_path, tiny_model_dir, method, bits):
    """`python -m tinyserve_quantize --method gptq|awq-gptq` writes the same packed layout as AWQ: config says awq/gemm with the
    bits used, the report has GPTQ's rows, and the runtime's INT4 decoder computes what the dequantized weights do."""
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig

    out = tmp_path / method
    summary = run(QuantizeConfig(tiny_model_dir, out, method=method, w_bit=bits, n_samples=16, seqlen=64),
                  log=lambda m: None, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "awq", "bits": bits, "group_size": 64, "zero_point": True, "version": "gemm",
                 "modules_to_not_convert": None}
    report = json.loads((out / "quantization_report.json").read_text())
    assert len(report["layers"]) == 14 and all("mse_gptq" in r for r in report["layers"])
    assert summary["gptq"]["percdamp"] == 0.01 and summary["sum_mse_gptq"] < summary["sum_mse_rtn"]
    assert (out / "quantization_report.png").stat().st_size > 1000

    ids = torch.randint(0, 49152, (24,), generator=torch.Generator().manual_seed(7))
    ref = load_model(out)(input_ids=ids[None]).logits[0, -1]
    runner = ModelRunner(out, RunnerConfig(device="cpu", dtype="float32", lm_head="dense", max_seq_len=64))
    slot = runner.alloc_slot()
    got = runner.prefill(slot, ids)
    runner.free_slot(slot)
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()


@pytest.mark.parametrize("flag, expected", [([], {"gptq": False, "awq-gptq": False, "awq-gptq-attn": True}),
                                            (["--act-order"], {"gptq": True, "awq-gptq": True, "awq-gptq-attn": True}),
                                            (["--no-act-order"], {"gptq": False, "awq-gptq": False, "awq-gptq-attn": False})])
def test_act_order_defaults_per_method_and_the_flag_overrides_it(flag, expected):
    from tinyserve_quantize.__main__ import parse_args

    cfg = parse_args(["--model", "m", "--out", "o", *flag]).gptq
    for method, act_order in expected.items():
        resolved = cfg.resolved(method)
        assert resolved.act_order is act_order
        assert resolved.value_hessian is (method == "awq-gptq-attn")
        assert resolved.fp32 is (method == "awq-gptq-attn")
