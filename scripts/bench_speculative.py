"""Speculative decoding measured in-process (the runner `serve` builds: position-invariant cpu-native), one sequence at
a time, greedy: decode tokens per second after the first token with speculation off and with k proposed tokens, on
an editing, a code and a free-chat prompt; the tokens must be identical. Proposals come from prompt lookup, or from
a draft model with --draft-model.

    python scripts/bench_speculative.py [--k 2,4,8] [--max-tokens 200] [--repeat 2]        # the default INT4 model
    python scripts/bench_speculative.py --model q15-int4 --draft-model q05-int4 --workloads code,chat --k 4
"""

import argparse
import inspect
import time

from tinyserve.generation import prefix_cache
from tinyserve.model import SeqChunk
from tinyserve.generation.sampling import SamplingParams
from tinyserve.generation.scheduler import Scheduler, SchedulerConfig, SeqSpec
from tinyserve.generation.tokenizer import Tokenizer
from tinyserve.runtime.runner import ModelRunner, RunnerConfig
from tinyserve_quantize.default_model import ensure_quantized_default
from tinyserve_quantize.text_data import eval_text


def workloads() -> dict[str, str]:
    paragraph = " ".join(eval_text().split()[200:330])
    code = inspect.getsource(prefix_cache.PrefixCache.take)
    return {
        "edit": "Rewrite the following paragraph exactly, but replace every 'I' with 'we':\n\n" + paragraph,
        "code": "Add a docstring line to each statement block of this Python method and give back the whole method:\n\n" + code,
        "chat": "Tell me a short story about a robot who learns to paint.",
    }


def decode(runner, tok, prompt: list[int], k: int, max_tokens: int, draft=None) -> tuple[list[int], float, Scheduler]:
    """-> (tokens, decode tokens/s after the first token, the scheduler for its stats)."""
    sched = Scheduler(runner, tok, SchedulerConfig(prefix_cache=False, speculate=k), draft=draft)
    (sid,) = sched.add([SeqSpec(tuple(prompt), max_tokens, SamplingParams(temperature=0))])
    tokens, first = [], None
    while sched.has_work():
        for out in sched.step():
            if out.seq_id == sid and out.token is not None:
                tokens.append(out.token.token)
                first = first or time.perf_counter()
    return tokens, (len(tokens) - 1) / (time.perf_counter() - first), sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", default="2,4,8")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2, help="alternating off / on runs per setting; the best of each is kept")
    ap.add_argument("--model", default=None, help="target model folder (default: the default INT4 model)")
    ap.add_argument("--draft-model", default=None, help="draft model folder (default: prompt lookup)")
    ap.add_argument("--workloads", default="edit,code,chat")
    a = ap.parse_args()
    folder = a.model or ensure_quantized_default()
    runner = ModelRunner(folder, RunnerConfig(device="cpu", num_slots=2, max_seq_len=4096, batch_invariant=True, position_invariant=True))
    draft = ModelRunner(a.draft_model, RunnerConfig(device="cpu", num_slots=1, max_seq_len=4096)) if a.draft_model else None
    tok = Tokenizer(folder, runner.cfg.eos_token_ids)
    print(f"{runner.model_dir.name} on {runner.backend.name}, position_invariant {runner.position_invariant}; proposals from "
          f"{draft.model_dir.name if draft else 'prompt lookup'}")
    for name, text in ((n, t) for n, t in workloads().items() if n in a.workloads.split(",")):
        prompt = tok.chat_ids([{"role": "user", "content": text}])
        for k in map(int, a.k.split(",")):
            best = {0: 0.0, k: 0.0}
            for _ in range(a.repeat):
                for kk in (0, k):
                    toks, rate, sched = decode(runner, tok, prompt, kk, a.max_tokens, draft)
                    best[kk] = max(best[kk], rate)
                    if kk == 0:
                        plain = toks
                    else:
                        same, st = toks == plain, sched.stats
            accept = st.accepted_tokens / max(st.draft_tokens, 1)
            per_step = len(plain) / max(st.verify_steps + (len(plain) - st.accepted_tokens - st.verify_steps), 1)
            print(f"{name:5s} ({len(prompt)} prompt tokens, {len(plain)} generated) k={k}: off {best[0]:6.1f} tok/s, "
                  f"on {best[k]:6.1f} tok/s = {best[k] / best[0]:.2f}x; accepted {st.accepted_tokens}/{st.draft_tokens} "
                  f"({accept:.0%}), {per_step:.2f} tokens per step; tokens {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
