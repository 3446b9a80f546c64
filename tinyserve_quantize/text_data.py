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
from pathlib import Path

BOTCHAN_FILE = "botchan.txt"
EVAL_START, EVAL_END = "CHAPTER I\n", "CHAPTER V."
CALIB_START, CALIB_END = "CHAPTER V.", "End of Project Gutenberg's Botchan"


@cache
def botchan() -> str:
    return resources.files("tinyserve_quantize").joinpath("data", BOTCHAN_FILE).read_text(encoding="utf-8")


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start)
    return text[i : text.index(end, i)]


def eval_text() -> str:
    return _between(botchan(), EVAL_START, EVAL_END)


def calib_text() -> str:
    return _between(botchan(), CALIB_START, CALIB_END)


def read_user_text(path: Path, what: str, error: type[Exception]) -> str:
    """A text file the user named (what: how messages call it), decoded as UTF-8. A missing, unreadable, non-UTF-8 or
    empty file raises `error` with a message that says which: replacing undecodable bytes would silently change
    the text that calibrates or is measured."""
    if not path.is_file():
        raise error(f"{what} {path} " + ("is not a regular file" if path.exists() else "does not exist"))
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                    f"convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise error(f"{what} {path} is empty")
    return text
