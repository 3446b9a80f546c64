"""Tokenizer wrapper (a local Hugging Face tokenizer), chat templates, incremental detokenization, stop strings."""

from collections.abc import Sequence
from pathlib import Path

from tinyserve.config import ConfigError

# Tokens of the prompt kept as left context when detokenizing the first generated tokens: SentencePiece drops the
# leading space of a slice's first token, so a slice must never start at a token whose text we emit.
DETOKENIZE_CONTEXT = 4


class Tokenizer:
    def __init__(self, folder: str | Path, extra_eos: Sequence[int] = ()):
        import transformers

        transformers.logging.set_verbosity_error()
        if not Path(folder).is_dir():
            raise ConfigError(f"{folder} is not a folder (a tokenizer is loaded from the model folder)")
        try:
            self.hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a tokenizer from {folder}: {str(e).splitlines()[0]}") from None
        eos = [self.hf.eos_token_id] if self.hf.eos_token_id is not None else []
        self.eos_token_ids: frozenset[int] = frozenset(eos) | frozenset(extra_eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Raw text -> ids, adding BOS (etc.) exactly as transformers does by default."""
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """Messages [{"role": ..., "content": ...}] -> prompt ids through the tokenizer's chat template (tools: shown
        to the model by a template that takes them)."""
        if not self.has_chat_template:
            raise ConfigError("this model's tokenizer has no chat template; use `generate` with a raw prompt")
        out = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True,
                                          tools=tools)
        return list(out["input_ids"])


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces without ever emitting half a UTF-8 character.

    Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens; decoding such a prefix yields U+FFFD.
    We decode a short window twice (without and with the new tokens) and emit only the difference, holding it back
    while it ends in U+FFFD (the rest of the character is still to come).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-DETOKENIZE_CONTEXT:])
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.ids)  # ids before this are already emitted (or are context)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation, an incomplete character is emitted as is)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


class StopStrings:
    """Cuts streamed text at the first stop string, even one split across tokens, and never leaks any part of it.

    Text that could be the beginning of a stop string is held back until it either completes one (then it is
    dropped and generation stops) or cannot anymore (then it is released).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """New text -> the part that is safe to emit now. Sets `stopped` when a stop string completes."""
        if not self.stops:
            return text
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[: min(hits)]
        hold = 0
        for s in self.stops:
            # Longest suffix of buf that is a proper prefix of s.
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
