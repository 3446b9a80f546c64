"""Golden greedy decode on the real default model, AWQ-quantized by our quantizer (the folder `chat` and `serve` use),
run with the default CPU runtime settings (bf16 compute, int8 lm_head): those of `chat` / `generate` (one sequence)
and those of `serve` (batch-invariant decode over several slots).

The ids were recorded from this runtime on the 2-core CPU VM; they were the same with 1 and 2 threads. They change
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
            # "... It's a vibrant metropolis that's been a major cultural and economic hub since ancient times.\n"
            "int4pack": [504, 3575, 282, 4649, 314, 7042, 28, 4206, 282, 9017, 30, 657, 506, 253, 8685, 39228, 338, 506, 719, 253, 1739,
                         2642, 284, 2536, 14157, 1675, 3201, 1711, 30, 2, 198, 2],
            # "... It's a vibrant metropolis that's been transformed into a global hub of culture, fashion, art, and" (the
            # fused prefill, tinyserve/fused_step.py: at token 23 14157 leads 2642 by one bf16 step, 19.375 / 19.25; after
            # the same prefill in torch ops they tied at 19.125 and argmax took 2642: "... global cultural and economic
            # powerhouse. Paris is renowned for")
            "native": [504, 3575, 282, 4649, 314, 7042, 28, 4206, 282, 9017, 30, 657, 506, 253, 8685, 39228, 338, 506, 719, 9543, 618,
                       253, 2224, 14157, 282, 2517, 28, 7317, 28, 984, 28, 284],
            "native serve": [504, 3575, 282, 4649, 314, 7042, 28, 4206, 282, 9017, 30, 657, 506, 253, 8685, 39228, 338, 506, 719,
                             9543, 618, 253, 2224, 14157, 282, 2517, 28, 7317, 28, 984, 28, 284],
            "int4pack serve": [504, 3575, 282, 4649, 314, 7042, 28, 4206, 282, 9017, 30, 657, 506, 253, 8685, 39228, 338, 506, 719,
                               9543, 618, 253, 2224, 2642, 284, 2536, 45595, 30, 7042, 314, 14104, 327],
        },
        "The capital of France is Paris, City of Light.",
    ),
    (
        "raw",
        "Once upon a time, in a small village,",
        {
            # " there lived a wise and kind woman named Elara. She was known for her kindness and compassion. She had a
            # daughter named Aria, who was a beautiful"
            "int4pack": [665, 4161, 253, 9357, 284, 1942, 4166, 3365, 3906, 4075, 30, 2306, 436, 1343, 327, 874, 11347, 284, 8047, 30,
                         2306, 761, 253, 7388, 3365, 330, 5484, 28, 617, 436, 253, 3953],
            # " there was a wise old woman named Elara who lived in a cozy cottage. She was known for her kindness and her
            # love for the local children. One day" (the fused decode step, tinyserve/fused_step.py: at token 23 the top
            # two logits, 874 and 26677, tie in bf16 (22.375); the same decoder in torch ops had 26677 one bf16 step
            # ahead. Before that, with torch's SDPA instead of our decode attention, token 1 was 4161, also from a tie.)
            "native": [665, 436, 253, 9357, 1573, 4166, 3365, 3906, 4075, 617, 4161, 281, 253, 18840, 31039, 30, 2306, 436, 1343, 327,
                       874, 11347, 284, 874, 2606, 327, 260, 1679, 1122, 30, 1963, 1194],
            "native serve": [665, 436, 253, 9357, 1573, 4166, 3365, 3906, 4075, 617, 4161, 281, 253, 18840, 31039, 30, 2306, 436, 1343,
                             327, 874, 11347, 284, 874, 2606, 327, 260, 1679, 1122, 30, 1963, 1194],
            "int4pack serve": [665, 4161, 253, 9357, 284, 1942, 4166, 3365, 3906, 4075, 30, 2306, 436, 1343, 327, 874, 11347, 284, 8047,
                               30, 2306, 761, 253, 7388, 3365, 330, 5484, 28, 617, 436, 253, 3953],
        },
        " there",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("serving", [False, True], ids=["chat", "serve"])
@torch.inference_mode()
def test_first_32_greedy_tokens_of_the_awq_default_model(serving):
    from tinyserve_quantize.default_model import ensure_awq_default
    from tinyserve.generate import GenerationParams, Session
    from tinyserve.runner import ModelRunner, RunnerConfig
    from tinyserve.sampling import SamplingParams
    from tinyserve.tokenizer import Tokenizer

    folder = ensure_awq_default()
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
