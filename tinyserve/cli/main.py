"""python -m tinyserve generate|chat|bench: argparse into dataclasses, one main per subcommand.

User mistakes (a bad folder, a prompt too long, an invalid setting) end with one line on stderr and exit status 2,
never a traceback.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace

from tinyserve.cli.default_model import ModelFolderError, resolve_model
from tinyserve.runtime.runner import RunnerConfig

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line."""


def user_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    from tinyserve.config import ConfigError
    from tinyserve.runtime.kv_cache import NoFreeSlot
    from tinyserve.runtime.runner import ContextOverflow
    from tinyserve.generation.sampling import SamplingError
    from tinyserve.weights import WeightsError

    return (CliError, ConfigError, WeightsError, SamplingError, ContextOverflow, NoFreeSlot, SafetensorError, ModelFolderError)


def load(model: str | None, runner_cfg: RunnerConfig):
    from tinyserve.runtime.runner import ModelRunner
    from tinyserve.generation.tokenizer import Tokenizer

    folder = resolve_model(model)
    runner = ModelRunner(folder, runner_cfg)
    tok = Tokenizer(folder, runner.cfg.eos_token_ids)
    return runner, tok


def load_draft(model: str | None, runner, tok, num_slots: int):
    """The --draft-model runner, beside the target's (same device, dtype, context and threads), after checking that
    the two models share the tokenizer: the draft's token ids must mean what the target's do."""
    from tinyserve.runtime.runner import ModelRunner
    from tinyserve.generation.tokenizer import Tokenizer

    if model is None:
        return None
    folder = resolve_model(model)
    rc = runner.config
    draft = ModelRunner(folder, RunnerConfig(device=str(runner.device), dtype=rc.dtype, max_seq_len=runner.max_seq_len, num_slots=num_slots,
                                             lm_head=rc.lm_head, threads=rc.threads))
    probe = "def main():\n    print('Hello, world!')  # \u00e9t\u00e9 \u4f60\u597d"
    dtok = Tokenizer(folder, draft.cfg.eos_token_ids)
    if dtok.encode(probe) != tok.encode(probe) or draft.cfg.vocab_size > runner.cfg.vocab_size:
        raise CliError(f"--draft-model {folder} does not share the tokenizer of {runner.model_dir}; a draft model must use the same one")
    return draft


# ---- arguments shared by the subcommands --------------------------------------------------------------------------


def add_runner_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--model", help="model folder (AWQ INT4 or float HF safetensors); default: the embedded SmolLM2-135M-Instruct, AWQ-quantized and cached on first use")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on CPU, fp16 on CUDA), bfloat16, float32, float16")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length (prompt + reply), capped by the model's")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="capture/compile the decode step (CUDA graphs on GPU)")
    g.add_argument("--lm-head", choices=("auto", "dense", "int8"), default="auto", help="output projection: auto, dense (exact), int8 (weight-only, per row)")


def runner_config(a: argparse.Namespace, num_slots: int = 1) -> RunnerConfig:
    # Position-invariant steps wherever the backend has them (cpu-native): a prompt, a reused prefix and a verified
    # speculation give the tokens decoding one token at a time gives, so --speculate and the prefix cache change no
    # output. Cold prompts prefill ~1.3x slower for it (BENCHMARKS.md, issue 19).
    return RunnerConfig(device=a.device, dtype=a.dtype, max_seq_len=a.max_seq_len, num_slots=num_slots, compile=a.compile, lm_head=a.lm_head,
                        threads=a.threads, position_invariant=True)


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    g.add_argument("--max-tokens", type=int, default=None)


def sampling_params(a: argparse.Namespace):
    from tinyserve.generation.sampling import SamplingParams

    return SamplingParams(
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty,
        seed=a.seed,
    )


# ---- generate ---------------------------------------------------------------------------------------------------


@dataclass
class GenerateConfig:
    model: str | None
    prompt: str
    runner: RunnerConfig
    params: object  # generate.GenerationParams
    json: bool = False
    speculate: int = 0  # proposed tokens verified per step (0: off)
    draft_model: str | None = None  # a smaller model proposing them (None: prompt lookup)


def generate_main(cfg: GenerateConfig) -> int:
    from tinyserve.generation.session import Session

    runner, tok = load(cfg.model, cfg.runner)
    draft = load_draft(cfg.draft_model, runner, tok, 1)  # a draft's own mistakes first: they hold on every backend
    session = Session(runner, tok, config=scheduler_config(runner, cfg.speculate), draft=draft)
    prompt = tok.encode(cfg.prompt)
    pieces, ids = [], []
    for chunk in session.stream(prompt, cfg.params):
        if chunk.token is not None:
            ids.append(chunk.token.token)
        pieces.append(chunk.text)
        if not cfg.json and chunk.text:
            print(chunk.text, end="", flush=True)
    st = session.stats
    if cfg.json:
        print(
            json.dumps(
                {
                    "model": str(runner.model_dir),
                    "text": "".join(pieces),
                    "token_ids": ids,
                    "prompt_tokens": st.prompt_tokens,
                    "completion_tokens": st.completion_tokens,
                    "finish_reason": st.finish_reason,
                    "ttft_s": round(st.ttft_s, 6),
                    "prefill_tok_s": round(st.prefill_tok_s, 2),
                    "decode_tok_s": round(st.decode_tok_s, 2),
                    "draft_tokens": st.draft_tokens,
                    "accepted_tokens": st.accepted_tokens,
                }
            )
        )
    else:
        print()
        print(f"[{st.completion_tokens} tokens, finish: {st.finish_reason}, first token {st.ttft_s:.3f} s, decode {st.decode_tok_s:.1f} tok/s"
              + (f", {st.speculation}" if st.draft_tokens else "") + "]", file=sys.stderr)
    return 0


# ---- chat -------------------------------------------------------------------------------------------------------


@dataclass
class ChatMainConfig:
    model: str | None
    runner: RunnerConfig
    chat: object  # chat.ChatConfig
    speculate: int = 0  # proposed tokens verified per step (0: off)
    draft_model: str | None = None  # a smaller model proposing them (None: prompt lookup)


def chat_main(cfg: ChatMainConfig) -> int:
    from tinyserve.cli.chat import Chat
    from tinyserve.generation.session import Session

    runner, tok = load(cfg.model, cfg.runner)
    if not tok.has_chat_template:
        raise CliError(f"{runner.model_dir} has no chat template; use `python -m tinyserve generate` with a raw prompt")
    draft = load_draft(cfg.draft_model, runner, tok, 1)
    Chat(Session(runner, tok, config=scheduler_config(runner, cfg.speculate), draft=draft), cfg.chat).run()
    return 0


def scheduler_config(runner, speculate: int):
    """The Session's scheduler: prompt-lookup speculation when asked for (it needs position-invariant steps)."""
    from tinyserve.generation.scheduler import SchedulerConfig

    if speculate and not runner.position_invariant:
        raise CliError(f"--speculate needs the cpu-native backend (position-invariant steps); this model runs on {runner.backend.name}")
    return SchedulerConfig(speculate=speculate)


def add_speculate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", type=int, default=0, metavar="K",
                   help="speculative decoding: verify up to K proposed tokens per step (default 0: off, 5 with --draft-model); the "
                        "same tokens, faster where the proposals are right (CPU, cpu-native backend)")
    p.add_argument("--draft-model", default=None, metavar="DIR",
                   help="a smaller model with the same tokenizer whose greedy continuation is proposed (default: prompt lookup)")


def speculate_of(a: argparse.Namespace) -> int:
    if a.speculate < 0:
        raise ValueError(f"--speculate must be >= 0, got {a.speculate}")
    return a.speculate or (5 if a.draft_model else 0)


# ---- entry point ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tinyserve", description="INT4 LLM inference: generate, chat, benchmark, serve")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a raw prompt (no chat template)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never part of the output")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_speculate_arg(g)
    add_runner_args(g)
    add_sampling_args(g, temperature=0.0, top_p=1.0)

    c = sub.add_parser("chat", help="interactive terminal chat (also reads piped stdin)")
    c.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    c.add_argument("--stats", action="store_true", help="print tokens/s after each reply (toggle with /stats)")
    add_speculate_arg(c)
    add_runner_args(c)
    add_sampling_args(c, temperature=0.7, top_p=0.9)

    b = sub.add_parser("bench", help="decode benchmark against transformers (see BENCHMARKS.md)")
    from tinyserve.cli import bench

    bench.add_args(b)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a web chat page",
                       description="OpenAI-compatible HTTP server (see README, Serve). On CPU, --threads defaults to "
                       "all cores but one: the HTTP event loop keeps a core of its own.")
    from tinyserve.server import app as server

    server.add_args(s)
    add_runner_args(s)
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    errors = user_errors()
    try:
        run = make_command(a)  # validation of the arguments happens here (dataclass __post_init__ checks)
    except (ValueError, *errors) as e:
        print(f"tinyserve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run()
    except errors as e:
        print(f"tinyserve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def make_command(a: argparse.Namespace):
    """Arguments -> a validated config bound to its main, ready to run."""
    if a.command == "generate":
        from tinyserve.generation.session import GenerationParams

        params = GenerationParams(max_tokens=256 if a.max_tokens is None else a.max_tokens, stop=tuple(a.stop), ignore_eos=a.ignore_eos, sampling=sampling_params(a))
        cfg = GenerateConfig(a.model, a.prompt, runner_config(a), params, a.json, speculate_of(a), a.draft_model)
        return lambda: generate_main(cfg)
    if a.command == "chat":
        from tinyserve.cli.chat import ChatConfig

        chat = ChatConfig(max_tokens=512 if a.max_tokens is None else a.max_tokens, system=a.system, stats=a.stats, sampling=sampling_params(a))
        cfg = ChatMainConfig(a.model, runner_config(a), chat, speculate_of(a), a.draft_model)
        return lambda: chat_main(cfg)
    if a.command == "serve":
        from tinyserve.server import app as server

        scfg = server.config_from_args(a)
        # Continuous batching: greedy output must not depend on what else is in the batch. On CPU the compute thread
        # count defaults to all cores but one: the HTTP event loop needs a core of its own, and OpenMP threads that
        # lose their core to it wait for each other (on the 2-core VM two threads made steps many times slower).
        threads = a.threads or max(1, len(os.sched_getaffinity(0)) - 1)
        rcfg = replace(runner_config(a, num_slots=a.num_slots), batch_invariant=True, threads=threads)
        if a.model:
            resolve_model(a.model)  # a wrong path fails now, before the port opens
        def load_both():
            runner, tok = load(a.model, rcfg)
            return runner, tok, load_draft(a.draft_model, runner, tok, a.speculate_max_batch)

        return lambda: server.main(scfg, load_both, user_errors())
    from tinyserve.cli import bench

    bcfg = bench.config_from_args(a)
    return lambda: bench.main(bcfg)


if __name__ == "__main__":
    sys.exit(main())
