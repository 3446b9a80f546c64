"""Golden greedy decode on the real default model, AWQ-quantized by our quantizer (the folder `chat` and `serve` use),
run with the default CPU runtime settings (bf16 compute, int8 lm_head).

The ids were recorded from this runtime on the 2-core CPU VM; they were the same with 1 and 2 threads. They change
when the quantizer's output, the CPU INT4 kernels' arithmetic or the decoder change: then check the new text reads
as well as this one before recording new ids.
"""

import pytest
import torch

GOLDEN = [
    (
        "chat",
        "What is the capital of France?",
        [504, 3575, 282, 4649, 314, 7042, 28, 4649, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1, 4093, 198, 57, 5248, 3946, 288, 7198, 253,
         1861, 338, 26064, 12143, 29, 9263],
        "The capital of France is Paris, France.",
    ),
    (
        "raw",
        "Once upon a time, in a small village,",
        [665, 4161, 253, 9357, 284, 1942, 4166, 3365, 3906, 4075, 30, 2306, 436, 1343, 327, 874, 11347, 284, 8047, 30, 2306, 761, 253,
         2375, 4897, 327, 967, 617, 592, 10032, 351, 480],
        " there lived a wise and kind woman named Elara. She was known for her kindness and compassion.",
    ),
]


@pytest.mark.slow
@torch.inference_mode()
def test_first_32_greedy_tokens_of_the_awq_default_model():
    from quantize.default_model import ensure_awq_default
    from tinyserve.generate import GenerationParams, Session
    from tinyserve.runner import ModelRunner, RunnerConfig
    from tinyserve.sampling import SamplingParams
    from tinyserve.tokenizer import Tokenizer

    folder = ensure_awq_default()
    runner = ModelRunner(folder, RunnerConfig(device="cpu"))
    tok = Tokenizer(folder, runner.cfg.eos_token_ids)
    session = Session(runner, tok)
    params = GenerationParams(max_tokens=32, ignore_eos=True, sampling=SamplingParams(temperature=0))
    for kind, prompt, ids, text_start in GOLDEN:
        prompt_ids = tok.chat_ids([{"role": "user", "content": prompt}]) if kind == "chat" else tok.encode(prompt, add_special_tokens=False)
        text, got = session.generate(prompt_ids, params)
        assert got == ids, (prompt, got, text)
        assert text.startswith(text_start)
