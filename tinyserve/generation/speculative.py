"""Speculative decoding's drafters: what the scheduler's speculative decode step proposes for verification.

PromptLookup needs no second model: it proposes the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (n = max_ngram down to min_ngram), in its prompt or its output. Editing, summarising and
code answers repeat their prompt, so a step that verifies k proposed tokens in one forward often keeps several.
DraftModel proposes a smaller model's greedy continuation.

    drafter = PromptLookup(prompt_ids)
    drafter.append(token)          # each token the sequence emits
    drafter.propose(4)             # -> up to 4 token ids (maybe none)

The index maps each n-gram to the end of its latest occurrence that has a following token, updated in O(max_ngram)
per token, so a proposal costs a few dict lookups whatever the sequence's length.
"""

from collections.abc import Sequence

import torch

# A draft model stops proposing once its own probability of its token falls below this (the best of those measured
# on free chat, at no cost on code: BENCHMARKS.md, "Speculative decoding with a draft model").
MIN_CONFIDENCE = 0.8


class PromptLookup:
    def __init__(self, tokens: Sequence[int], max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]  # n -> n-gram -> end
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        """The sequence grew by one token: the n-grams ending just before it now have a continuation."""
        L = len(self.tokens)
        for n in range(self.min_ngram, min(self.max_ngram, L) + 1):
            self.index[n][tuple(self.tokens[L - n : L])] = L
        self.tokens.append(int(token))

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix, or []."""
        L = len(self.tokens)
        for n in range(min(self.max_ngram, L), self.min_ngram - 1, -1):
            end = self.index[n].get(tuple(self.tokens[L - n :]))
            if end is not None:
                return self.tokens[end : end + k]
        return []


class DraftModel:
    """Proposals from a smaller model that shares the tokenizer (`--draft-model`): its greedy continuation, run in a
    slot of its own runner. Before proposing, the slot is cut back to the longest prefix it holds of the sequence's
    tokens (verification may have rejected some of its last proposals) and the rest is fed as one chunk; then k - 1
    decode steps give up to k tokens, fewer once the draft's own probability of its token falls below min_confidence
    (drafting costs a fraction of a target step each; a doubtful token is seldom kept). Greedy proposals are one token for sure, so SequenceSampler.verify keeps the target's
    distribution when sampling too.

    Built only when the draft runner has a free slot; close() gives it back."""

    def __init__(self, runner, tokens: Sequence[int], min_confidence: float = MIN_CONFIDENCE):
        self.runner, self.min_confidence = runner, min_confidence
        self.slot = runner.alloc_slot()
        self.tokens = [int(t) for t in tokens]
        self.held: list[int] = []  # the tokens whose keys and values the slot holds, in order

    def append(self, token: int) -> None:
        self.tokens.append(int(token))

    def propose(self, k: int) -> list[int]:
        r, limit = self.runner, self.runner.max_seq_len
        if k <= 0 or len(self.tokens) >= limit:
            return []
        n = 0
        top = min(len(self.held), len(self.tokens) - 1, r.length(self.slot))  # the last token must run: its logits
        while n < top and self.held[n] == self.tokens[n]:
            n += 1
        r.truncate(self.slot, n)
        logits = r.prefill(self.slot, self.tokens[n:], start=n)  # [V]
        self.held = list(self.tokens)
        out = []
        while True:
            p, t = torch.softmax(logits, dim=-1).max(dim=-1)
            out.append(int(t))
            # Another draft step costs a fraction of a target step: stop once the draft itself doubts its token.
            if len(out) == k or len(self.held) + 1 >= limit or float(p) < self.min_confidence:
                return out
            logits = r.decode([self.slot], [out[-1]])[0]
            self.held.append(out[-1])

    def close(self) -> None:
        self.runner.free_slot(self.slot)
