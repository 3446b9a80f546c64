"""Golden greedy decode on the real default model, quantized by the default recipe (default_model.DEFAULT_RECIPE: the
folder `chat` and `serve` use),
run with the default CPU runtime settings (bf16 compute, int8 lm_head): those of `chat` / `generate` (one sequence)
and those of `serve` (batch-invariant decode over several slots).

The ids were recorded from this runtime on the 2-core CPU VM (last: 2026-12-06, AMD EPYC, our kernels' AVX512-BF16
engine); they were the same with 1 and 2 threads. They change
when the quantizer's output, the CPU INT4 kernels' arithmetic or the decoder change: then check the new text reads
as well as this one before recording new ids.

They also depend on which CPU kernels run, so they are recorded per kernel: torch's int4 and int8 ops ("int4pack":
CPUs without AVX512-BF16 and VNNI, or TINYSERVE_CPU_KERNEL=0) and our own (tinyserve_kernels/cpu_native.py: the INT4 linears
and the int8 lm_head, decode attention, and the fused decode and prefill steps around them). Our INT4 and int8 kernels' inner sums
are exact integers, so all their engines (AMX, AVX512-VNNI, AVX512BW, portable) give the same bits; the decode attention
and the fused step give the same bits on every AVX-512 engine (the portable build's sums run in another order). One
set of ids serves every AVX-512 CPU that uses them.
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
            for kernel in ("int4pack", "native", "native serve", "int4pack serve")
        },
        "The capital of France is Paris.",
    ),
    (
        "raw",
        "Once upon a time, in a small village,",
        {
            # " there was a young girl named Aria. She was a curious and adventurous soul with a heart full of dreams.
            # She loved to explore the world, from the"
            "native": [665, 436, 253, 1805, 8180, 3365, 330, 5484, 30, 2306, 436, 253, 7436, 284, 28058, 8664, 351, 253, 1911,
                       2073, 282, 10074, 30, 2306, 5732, 288, 2217, 260, 905, 28, 429, 260],
            "native serve": [665, 436, 253, 1805, 8180, 3365, 330, 5484, 30, 2306, 436, 253, 7436, 284, 28058, 8664, 351, 253,
                             1911, 2073, 282, 10074, 30, 2306, 5732, 288, 2217, 260, 905, 28, 429, 260],
            "int4pack serve": [665, 436, 253, 1805, 8180, 3365, 330, 5484, 30, 2306, 436, 253, 7436, 284, 28058, 8664, 351, 253,
                               1911, 2073, 282, 10074, 30, 2306, 5732, 288, 2217, 260, 905, 28, 429, 260],
            # torch's ops, one sequence: from token 10 " She had a special gift that no one else had. She could see
            # the world in different ways, and she loved"
            "int4pack": [665, 436, 253, 1805, 8180, 3365, 330, 5484, 30, 2306, 761, 253, 1767, 10274, 338, 787, 582, 1745, 761,
                         30, 2306, 856, 963, 260, 905, 281, 896, 1853, 28, 284, 1041, 5732],
        },
        " there was a young girl named Aria.",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("serving", [False, True], ids=["chat", "serve"])
@torch.inference_mode()
def test_first_32_greedy_tokens_of_the_default_int4_model(serving):
    from tinyserve_quantize.default_model import ensure_quantized_default
    from tinyserve.generate import GenerationParams, Session
    from tinyserve.runner import ModelRunner, RunnerConfig
    from tinyserve.sampling import SamplingParams
    from tinyserve.tokenizer import Tokenizer

    folder = ensure_quantized_default()
    # serve on 2 cores: batch-invariant decode, 1 compute thread (its default: all cores but one). With our kernels the
    # ids are the same with 2 threads; with torch's ops the batched path's depend on the thread count (2 threads changed
    # token 31 of the chat prompt).
    rc = RunnerConfig(device="cpu", num_slots=4, batch_invariant=True, threads=1) if serving else RunnerConfig(device="cpu")
    runner = ModelRunner(folder, rc)
    # Our kernels' sums are exact integers: every engine gives the same bits, so one set of ids covers them all.
    kernel = "int4pack" if runner.weights.layers[0].qkv.w.native is None else "native"
    kernel += " serve" if serving else ""
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
