"""Prompt lookup, speculative decoding's drafter that needs no second model: propose the tokens that followed the
latest earlier occurrence of the sequence's last n tokens (n = max_ngram down to min_ngram), in its prompt or its
output. Editing, summarising and code answers repeat their prompt, so a step that verifies k proposed tokens in one
forward (the scheduler's speculative decode) often keeps several of them.

    drafter = PromptLookup(prompt_ids)
    drafter.append(token)          # each token the sequence emits
    drafter.propose(4)             # -> up to 4 token ids (maybe none)

The index maps each n-gram to the end of its latest occurrence that has a following token, updated in O(max_ngram)
per token, so a proposal costs a few dict lookups whatever the sequence's length.
"""

from collections.abc import Sequence


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
