"""Golden greedy decode on the real default model, quantized by the default recipe (default_model.DEFAULT_RECIPE: the
folder `chat` and `serve` use),
run with the default CPU runtime settings (bf16 compute, int8 lm_head): those of `chat` / `generate` (one sequence)
and those of `serve` (batch-invariant decode over several slots).

The ids were recorded from this runtime on the 2-core CPU VM (last: 2026-12-06, AMD EPYC, our kernels' AVX512-BF16
engine); they were the same with 1 and 2 threads. They change
when the quantizer's output, the CPU INT4 kernels' arithmetic or the decoder change: then check the new text reads
as well as this one before recording new ids.

They are recorded per backend family (tinyserve/runtime/backends/): "eager" (torch's int4 and int8 ops: CPUs without
AVX512-BF16 and VNNI, or TINYSERVE_CPU_KERNEL=0) and "cpu-native" (our C++ decoder and kernels), each for one sequence
and for serving. Our kernels' inner sums are exact integers, so every AVX-512 engine gives the same bits. Since the
single forward (issue 16) all four sets are the same ids on this machine; test_backends_track_the_reference_forward
checks each backend against the reference forward itself. On a CPU without native bf16 (AVX2 only) the quantizer
calibrates in fp32 (tinyserve_quantize.awq.native_compute_dtype), which writes other bytes: those folders have their
own "fp32-calibrated" sets, recorded on an AMD EPYC Zen 3 (2026-12-07) with the eager backend (the only one there),
whose prompt weights are fp32 on such CPUs (tinyserve_kernels/cpu.py, DENSE_DTYPE); the same with 1 and 2 threads.
"""

import pytest
import torch

GOLDEN = [  # (kind, prompt, {kernel: ids}, text start)
    (
        "chat",
        "What is the capital of France?",
        {
            # "The capital of France is Paris." then end of sequence (id 2 at token 7; the test ignores it, so the
            # rest is the model going on past its turn). The same ids from every kernel and mode.
            kernel: [504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1, 4093, 198, 57, 744, 253, 216, 35,
                     37, 29, 3610, 29, 793, 4672, 617, 553, 719]
            for kernel in ("eager", "cpu-native", "cpu-native serve", "eager serve")
        } | {
            # quantized with fp32 arithmetic (an AVX2-only CPU, 2026-12-07, AMD EPYC Zen 3): token 23 differs
            kernel: [504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1, 4093, 198, 57, 744, 253, 216, 35,
                     32, 29, 3610, 29, 793, 4672, 617, 553, 719]
            for kernel in ("eager fp32-calibrated", "eager serve fp32-calibrated")
        },
        "The capital of France is Paris.",
    ),
    (
        "raw",
        "Once upon a time, in a small village,",
        {
            # " there was a young girl named Aria. She was a curious and adventurous soul with a heart full of dreams.
            # She loved to explore the world, from the"
            "cpu-native": [665, 436, 253, 1805, 8180, 3365, 330, 5484, 30, 2306, 436, 253, 7436, 284, 28058, 8664, 351, 253, 1911,
                       2073, 282, 10074, 30, 2306, 5732, 288, 2217, 260, 905, 28, 429, 260],
            "cpu-native serve": [665, 436, 253, 1805, 8180, 3365, 330, 5484, 30, 2306, 436, 253, 7436, 284, 28058, 8664, 351, 253,
                             1911, 2073, 282, 10074, 30, 2306, 5732, 288, 2217, 260, 905, 28, 429, 260],
            "eager serve": [665, 436, 253, 1805, 8180, 3365, 330, 5484, 30, 2306, 436, 253, 7436, 284, 28058, 8664, 351, 253,
                               1911, 2073, 282, 10074, 30, 2306, 5732, 288, 2217, 260, 905, 28, 429, 260],
            "eager": [665, 436, 253, 1805, 8180, 3365, 330, 5484, 30, 2306, 436, 253, 7436, 284, 28058, 8664, 351, 253, 1911,
                      2073, 282, 10074, 30, 2306, 5732, 288, 2217, 260, 905, 28, 429, 260],
        } | {
            # " there was a young woman named Aria. She had a heart full of dreams, and she was determined to make a
            # difference.\n\nAria's family"
            kernel: [665, 436, 253, 1805, 4166, 3365, 330, 5484, 30, 2306, 761, 253, 1911, 2073, 282, 10074, 28, 284, 1041, 436,
                     5250, 288, 919, 253, 3193, 30, 198, 198, 49, 5484, 506, 1564]
            for kernel in ("eager fp32-calibrated", "eager serve fp32-calibrated")
        },
        " there was a young",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("serving", [False, True], ids=["chat", "serve"])
@torch.inference_mode()
def test_first_32_greedy_tokens_of_the_default_int4_model(serving):
    from tinyserve_quantize.awq import native_compute_dtype
    from tinyserve_quantize.default_model import ensure_quantized_default
    from tinyserve.generation.session import GenerationParams, Session
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig
    from tinyserve.generation.sampling import SamplingParams
    from tinyserve.generation.tokenizer import Tokenizer

    folder = ensure_quantized_default()
    # serve on 2 cores: batch-invariant decode, 1 compute thread (its default: all cores but one). With our kernels the
    # ids are the same with 2 threads; with torch's ops the batched path's depend on the thread count (2 threads changed
    # token 31 of the chat prompt).
    rc = RunnerConfig(device="cpu", num_slots=4, batch_invariant=True, threads=1) if serving else RunnerConfig(device="cpu")
    runner = ModelRunner(folder, rc)
    # Our kernels' sums are exact integers: every engine gives the same bits, so one set of ids covers them all.
    # The folder's bytes depend on the quantizer's arithmetic: bf16 where the CPU computes it, fp32 on AVX2-only CPUs.
    calibrated = "" if native_compute_dtype() == torch.bfloat16 else " fp32-calibrated"
    kernel = runner.backend.name + (" serve" if serving else "") + calibrated
    if kernel not in GOLDEN[0][2]:
        pytest.skip(f"no golden ids recorded for the {kernel} kernel (its last bits differ from the recorded ones)")
    tok = Tokenizer(folder, runner.cfg.eos_token_ids)
    session = Session(runner, tok)
    params = GenerationParams(max_tokens=32, ignore_eos=True, sampling=SamplingParams(temperature=0))
    for kind, prompt, kernel_ids, text_start in GOLDEN:
        ids = kernel_ids[kernel]
        prompt_ids = tok.chat_ids([{"role": "user", "content": prompt}]) if kind == "chat" else tok.encode(prompt, add_special_tokens=False)
        text, got = session.generate(prompt_ids, params)
        assert got == ids, (prompt, got, text)
        assert text.startswith(text_start)


# The bf16 tie margin: backends and the reference forward differ in their bf16 rounding points and the backends' lm_head
# is int8 rows, so their logits differ by up to ~0.9 here (measured on this model: 0.45-0.88 at every golden position).
# Where the reference's best two logits are closer than this, either token is a correct greedy choice.
TIE = 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kernel_switch", ["auto", "0"], ids=["default-backend", "eager"])
def test_backends_track_the_reference_forward(kernel_switch, monkeypatch):
    """Teacher-forced over each golden sequence: at every position the backend's greedy token (prefill, then its real
    decode steps) is the reference forward's (model.forward on the unconverted weights: exact dequant, bf16), or the
    reference's margin between the two is within TIE. On this machine there was no such tie case: all agree."""
    from tinyserve_quantize.default_model import ensure_quantized_default
    from tinyserve.runtime.kv_cache import KVCache
    from tinyserve.model import CacheAttention, SeqChunk, forward, rope_tables
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig
    from tinyserve.generation.tokenizer import Tokenizer
    from tinyserve.weights import load_weights

    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", kernel_switch)
    folder = ensure_quantized_default()
    runner = ModelRunner(folder, RunnerConfig(device="cpu", max_seq_len=256))
    if kernel_switch == "0":
        assert runner.backend.name == "eager"
    tok = Tokenizer(folder, runner.cfg.eos_token_ids)
    raw = load_weights(folder, runner.cfg, torch.device("cpu"), torch.bfloat16)
    cos, sin = (t.bfloat16() for t in rope_tables(runner.cfg.rope, runner.cfg.head_dim, 256))
    for kind, prompt, kernel_ids, _ in GOLDEN:
        prompt_ids = tok.chat_ids([{"role": "user", "content": prompt}]) if kind == "chat" else tok.encode(prompt, add_special_tokens=False)
        ids = next(iter(kernel_ids.values()))
        seq = prompt_ids + ids
        cache = KVCache(runner.cfg, 1, 256, torch.bfloat16, torch.device("cpu"))
        with torch.inference_mode():
            ref = forward(runner.cfg, raw, torch.tensor(seq), torch.arange(len(seq)), CacheAttention(cache.k, cache.v, [SeqChunk(0, 0, seq)]),
                          cos, sin).float()[len(prompt_ids) - 1 :]  # [len(ids) + 1, V]: the prediction after each token
        slot = runner.alloc_slot()
        got = [runner.prefill(slot, prompt_ids)] + [runner.decode([slot], [t])[0] for t in ids[:-1]]
        runner.free_slot(slot)
        for i, logits in enumerate(got):
            choice, best = int(logits.argmax()), int(ref[i].argmax())
            assert choice == best or ref[i, best] - ref[i, choice] < TIE, (runner.backend.name, kind, i, choice, best)
