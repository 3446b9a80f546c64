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
        [504, 3575, 282, 4649, 314, 7042, 28, 4206, 282, 260, 4206, 282, 260, 4206, 282, 7042, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1,
         4093, 198, 57, 5248, 3946, 288],
        "The capital of France is Paris, City of the City of the City of Paris.",
    ),
    (
        "raw",
        "Once upon a time, in a small village,",
        [665, 436, 253, 555, 3365, 414, 593, 290, 30, 909, 436, 253, 38688, 617, 1135, 511, 11695, 282, 1495, 28, 429, 2549, 288,
         23812, 30, 909, 761, 253, 6221, 3365, 3906, 4075],
        " there was a man named Eberle. He was a blacksmith who made all sorts of things, from tools to armor. He had a wife named Elara",
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
