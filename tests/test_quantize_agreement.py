"""The chat agreement measure (tinyserve_quantize/agreement.py) on the tiny random-weight models."""

import copy

import pytest
import torch

from tinyserve_quantize.agreement import TOP1_TOKENS, agreement, builtin_instructions, greedy_answers, reference_answers
from tinyserve_quantize.model_io import load_model, load_tokenizer

INSTRUCTIONS = ["Name three colors.", "What is 7 times 8?", "Write a haiku about the sea.", "Hi"]  # unequal lengths


ANSWER = 40  # answer tokens (the tiny models never stop on their own); more than TOP1_TOKENS


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    return model, tok, reference_answers(model, tok, INSTRUCTIONS, ANSWER)


def test_builtin_set_is_fifty_distinct_instructions():
    items = builtin_instructions()
    assert len(items) == 50 and len(set(items)) == 50


def test_a_model_agrees_with_itself(tiny):
    """Teacher forcing on the model's own greedy answers must predict every token: this fails if the padded batch,
    the positions or the offset of the predicted tokens are wrong."""
    model, tok, ref = tiny
    assert all(len(a) >= 1 for a in ref.answers)
    result = agreement(model, tok, ref)
    assert result["top1"] == 1.0 and result["first_line"] == 1.0 and result["instructions"] == len(INSTRUCTIONS)


def test_batched_answers_equal_one_at_a_time(tiny):
    model, tok, ref = tiny
    for prompt, answer in zip(ref.prompts[:2], ref.answers[:2]):
        assert greedy_answers(model, [prompt], ref.eos, ANSWER, ref.pad) == [answer]


def test_perturbed_weights_agree_less(tiny):
    model, tok, ref = tiny
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std())
    result = agreement(noisy, tok, ref)
    assert result["top1"] < 0.9
    assert 0 <= result["first_line"] <= 1
    assert sum(min(len(a), TOP1_TOKENS) for a in ref.answers) > 0
