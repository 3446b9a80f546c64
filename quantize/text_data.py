"""The project's built-in text: Botchan (Natsume Soseki, tr. Yasotaro Morri; Project Gutenberg #8868, public domain),
as shipped in the sentencepiece 0.2.3 source distribution (test/botchan.txt).

Two fixed slices that do not overlap, cut at chapter headings so that they do not depend on any tokenizer:
- evaluation: from "CHAPTER I" up to "CHAPTER V." (chapters I-IV, ~21k SmolLM2 tokens; perplexity uses the first
  16,384 tokens of it by default, the protocol under which the reference numbers in ../shared/FACTS.md were taken);
- calibration: from "CHAPTER V." up to the end of the novel (chapters V-XI, ~43k SmolLM2 tokens).
The Gutenberg header and licence are in neither.
"""

from functools import cache
from importlib import resources

BOTCHAN_FILE = "botchan.txt"
EVAL_START, EVAL_END = "CHAPTER I\n", "CHAPTER V."
CALIB_START, CALIB_END = "CHAPTER V.", "End of Project Gutenberg's Botchan"


@cache
def botchan() -> str:
    return resources.files("quantize").joinpath("data", BOTCHAN_FILE).read_text(encoding="utf-8")


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start)
    return text[i : text.index(end, i)]


def eval_text() -> str:
    return _between(botchan(), EVAL_START, EVAL_END)


def calib_text() -> str:
    return _between(botchan(), CALIB_START, CALIB_END)
