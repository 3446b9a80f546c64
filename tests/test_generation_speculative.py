"""Speculative decoding's parts alone: prompt lookup's proposals, and the sampling rule that keeps the target
distribution (SequenceSampler.verify). The scheduler's end-to-end checks are in test_server_scheduler.py."""

import pytest
import torch

from tinyserve.generation.sampling import SamplingParams, SequenceSampler
from tinyserve.generation.speculative import PromptLookup


def test_prompt_lookup_proposes_what_followed_the_latest_match_of_the_longest_suffix():
    d = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 8, 1, 2])
    assert d.propose(3) == [3, 4, 5]  # (1, 2) last seen at the start; (2,) alone would give [3, 8, 1]
    d.append(3)
    assert d.propose(2) == [4, 5]  # (1, 2, 3)
    d.append(7)
    assert d.propose(4) == []  # 7 never seen before
    assert PromptLookup([5, 5, 5]).propose(4) == [5]
    assert PromptLookup([]).propose(3) == [] and PromptLookup([4]).propose(3) == []
    with pytest.raises(ValueError):
        PromptLookup([1], max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.2, top_p=0.9),
    SamplingParams(temperature=0.7, top_k=5, min_p=0.05),
])
@pytest.mark.parametrize("draft", [0, 3, 11])  # likely, middling, and cut by top-k / top-p (or merely unlikely)
def test_verify_samples_the_target_distribution_whatever_the_draft(params, draft):
    """Over 8,000 positions, the tokens verify() returns for a fixed draft follow the distribution draw() samples
    from (distribution(), normalized): every token's frequency within 4.5 standard errors of its probability."""
    torch.manual_seed(0)
    V = 12
    logits = torch.randn(V) * 2
    n = 8_000
    s = SequenceSampler(params, [1, 2], V)
    got = torch.bincount(torch.tensor([s.verify(logits, draft) for _ in range(n)]), minlength=V).float()
    probs, idx = s.distribution(logits)
    p = torch.zeros(V).index_add_(0, idx if idx is not None else torch.arange(V), probs)
    p = p / p.sum()
    se = (p * (1 - p) / n).sqrt().clamp(min=1 / n)
    assert ((got / n - p).abs() <= 4.5 * se).all(), (got / n, p)
    assert got[p == 0].sum() == 0  # a draft outside the candidates is never kept


def test_verify_is_argmax_when_greedy():
    s = SequenceSampler(SamplingParams(temperature=0.0), [], 6)
    logits = torch.tensor([0.1, 2.0, 0.3, 1.9, -1.0, 0.0])
    assert s.verify(logits, 3) == 1 and s.verify(logits, 1) == 1 and s.verify(logits, None) == 1
