"""The CLI as a user runs it: `generate --json`, one-line errors, and the terminal chat through a pseudo-terminal
(pexpect) and through piped stdin."""

import json
import os
import subprocess
import sys

import pexpect
import pytest

from tinyserve.cli.main import main
from tinyserve.generation.tokenizer import Tokenizer
from runtime_helpers import write_rtn_folder

CLI = [sys.executable, "-m", "tinyserve"]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama, INT4: the CLI tests need one model, not both families."""
    return write_rtn_folder(tiny_llama_dir, tmp_path_factory.mktemp("cli-int4"), group_size=32)


def test_generate_json(model_dir):
    p = run_cli("generate", "--model", str(model_dir), "--prompt", "Once upon a time", "--max-tokens", "12", "--ignore-eos", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    tok = Tokenizer(model_dir)
    assert len(out["token_ids"]) == out["completion_tokens"] == 12
    assert out["text"] == tok.decode(out["token_ids"])
    assert out["prompt_tokens"] == len(tok.encode("Once upon a time"))
    assert out["finish_reason"] == "length" and out["ttft_s"] > 0 and out["decode_tok_s"] > 0


def test_generate_streams_text_and_stops(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "Once upon a time", "--max-tokens", "12", "--ignore-eos"]
    assert main([*args, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["text"]
    assert main(args) == 0
    assert capsys.readouterr().out == full + "\n"
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"


def test_generate_with_speculation_gives_the_same_tokens(model_dir, capsys, monkeypatch):
    """--speculate 4 (prompt lookup, position-invariant steps; our CPU kernels forced on): the greedy tokens of plain
    generation, and the proposals it made reported in --json."""
    from native_variants import need

    need("native")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "1")
    args = ["generate", "--model", str(model_dir), "--prompt", "one two three one two three one two", "--max-tokens", "64",
            "--ignore-eos", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--speculate", "4"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"] and plain["draft_tokens"] == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--model", "/nonexistent/model", "--prompt", "x"], "no such folder"),
        (["generate", "--model", "{tiny}", "--prompt", "x", "--speculate", "-1"], "--speculate must be >= 0"),
        (["generate", "--model", "{tiny}", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "--model", "{tiny}", "--prompt", "x", "--max-tokens", "0"], "max_tokens must be positive"),
        (["generate", "--model", "{tiny}", "--prompt", "word " * 600, "--max-seq-len", "64"], "the context holds 64"),
        (["generate", "--model", "{tiny}", "--prompt", "x", "--dtype", "float8"], "unknown dtype"),
        (["chat", "--model", "{empty}"], "no config.json"),
        (["generate", "--model", "{tiny}", "--prompt", "x", "--draft-model", "{qwen}"], "does not share the tokenizer"),
    ],
)
def test_user_mistakes_are_one_line_errors(model_dir, tiny_qwen2_dir, tmp_path, capsys, args, message):
    args = [a.format(tiny=model_dir, qwen=tiny_qwen2_dir, empty=tmp_path) for a in args]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    p = run_cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert p.returncode == 2 and p.stderr.startswith("tinyserve: error:") and "Traceback" not in p.stderr, p.stderr


def test_chat_with_piped_stdin(model_dir):
    p = run_cli("chat", "--model", str(model_dir), "--max-tokens", "6", "--temperature", "0", "--stats",
                stdin="Hello there\n/reset\nSecond message\n/system Be brief.\nThird\n/exit\nnever read\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.count("tok/s") == 3  # three replies, each followed by its stats line
    assert "(conversation cleared)" in out and "(system prompt set)" in out
    assert "tinyserve chat" not in out  # no banner or prompts when stdin is not a terminal


def test_chat_drops_the_oldest_turns_when_the_context_is_full(model_dir):
    # 128 positions: a reply keeps 32 free; each turn adds ~16 (template + message + 8-token reply).
    msgs = "".join(f"message number {i}\n" for i in range(12))
    p = run_cli("chat", "--model", str(model_dir), "--max-tokens", "8", "--temperature", "0", "--max-seq-len", "128",
                stdin=msgs + "word " * 200 + "\n")
    assert p.returncode == 0, p.stderr
    assert "oldest turn" in p.stdout and "128-token context" in p.stdout
    assert "(not sent:" in p.stdout  # a message longer than the context on its own


@pytest.mark.slow
def test_chat_in_a_terminal_reset_and_ctrl_c(default_fp16_dir):
    """A real terminal: banner and prompt, a streamed reply, /stats, /reset, Ctrl-C stopping a long reply without
    quitting (mid-reply, and right after the message is sent), then /exit. The real model (unquantized, bf16) is slow
    enough on CPU for Ctrl-C to land mid-reply."""
    child = pexpect.spawn(CLI[0], [*CLI[1:], "chat", "--model", str(default_fp16_dir), "--temperature", "0", "--max-tokens", "400"],
                          env=ENV, encoding="utf-8", timeout=120)
    try:
        child.expect("tinyserve chat")
        child.expect("> ")
        child.sendline("/stats")
        child.expect(r"\(stats on\)")
        child.expect("> ")
        child.sendline("What is the capital of France? Answer in one word.")
        child.expect("Paris")
        child.expect(r"tok/s")
        child.expect("> ")
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        child.expect("> ")
        child.sendline("Write a very long story about a dragon, with many chapters.")
        child.expect(r"chapters\.\r?\n")  # the terminal's echo of the line
        child.expect(r"\w+ \w+ \w+")  # the reply is streaming
        child.sendintr()
        child.expect(r"\(stopped\)")
        child.expect("> ")
        # Ctrl-C at once, before the first token. Where it lands is a race: while the line is still being read (the
        # line is dropped: "... /exit to quit)") or after (the reply stops before its first token: "(stopped)").
        # Either way the chat goes on; this step used to hang in GNU readline (see chat.keep_typed_input).
        child.sendline("Tell me another story.")
        child.sendintr()
        child.expect([r"\(stopped\)", r"/exit to quit\)"], timeout=30)
        child.expect("> ")
        child.sendline("/stats")
        child.expect(r"\(stats off\)")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_right_after_enter_is_never_lost_and_never_hangs(model_dir):
    """Ctrl-C sent in the same instant as a line, many times over: each one either drops the line at the prompt or
    stops its reply, and the chat answers the next prompt. Before the fix this hung in GNU readline within a few rounds
    (the kernel's Ctrl-C flush emptied the input between readline's select and its read)."""
    child = pexpect.spawn(CLI[0], [*CLI[1:], "chat", "--model", str(model_dir), "--max-tokens", "64"],
                          env=ENV, encoding="utf-8", timeout=60)
    try:
        child.expect("tinyserve chat")
        child.expect("> ")
        child.timeout = 10
        for _ in range(60):
            child.sendline("Hello there")
            child.sendintr()
            child.expect([r"/exit to quit\)", r"\(stopped\)"])
            child.expect(r"\r\n> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
