"""Prefix cache, measured in-process on the default INT4 model (the scheduler and runner `serve` uses, 16 slots):

  shared  16 requests arriving at once, each a ~1,000-token system prompt (the same) + a different question:
          prompt tokens actually prefilled and wall time, cache off vs on;
  chat    a 10-turn conversation (~150-token user turns, replies up to 150 tokens): time to first token per turn,
          cache off vs on (turn 10 against turn 1).
  return  32 conversations (~400-token first turns) on the 16 slots, one after the other, then each one's second
          turn: prompt tokens prefilled in the second round, with the host-memory tier (prefix_cache_bytes, 1 GiB)
          vs slots only.

    python scripts/bench_prefix_cache.py [--prefill-chunk 512] [--position-invariant off,on] [--scenarios shared,chat,return]

--position-invariant: the runner's RunnerConfig.position_invariant (serve's is on): off reuses whole prompt chunks
only, on any prefix, replies included. Each chat run says whether its replies equal the cache-off run's.
"""

import argparse
import time

from tinyserve.generation.sampling import SamplingParams
from tinyserve.generation.scheduler import Scheduler, SchedulerConfig, SeqSpec
from tinyserve.generation.tokenizer import Tokenizer
from tinyserve.runtime.runner import ModelRunner, RunnerConfig
from tinyserve_quantize.default_model import ensure_quantized_default
from tinyserve_quantize.text_data import eval_text

GREEDY = SamplingParams(temperature=0)


def run(sched: Scheduler, specs: list[SeqSpec]) -> tuple[float, dict[int, float]]:
    """Step until done -> (wall s, seq id -> seconds to its first output)."""
    t0 = time.perf_counter()
    ids = sched.add(specs)
    first: dict[int, float] = {}
    while sched.has_work():
        for out in sched.step():
            first.setdefault(out.seq_id, time.perf_counter() - t0)
    return time.perf_counter() - t0, {i: first[i] for i in ids}


def shared(runner, tok, chunk: int) -> None:
    words = eval_text().split()
    system = " ".join(words[:760])
    prompts = [tok.chat_ids([{"role": "system", "content": system},
                             {"role": "user", "content": f"Question {i}: who is {words[800 + 7 * i]}?"}]) for i in range(16)]
    print(f"shared: 16 prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, max_tokens 16")
    for cache in (False, True):
        sched = Scheduler(runner, tok, SchedulerConfig(prefill_chunk=chunk, prefix_cache=cache))
        wall, _ = run(sched, [SeqSpec(tuple(p), 16, GREEDY) for p in prompts])
        print(f"  prefix cache {'on ' if cache else 'off'}: {sched.stats.prompt_tokens} prompt tokens prefilled, "
              f"{sched.stats.cached_tokens} served from the cache, {wall:.1f} s")


def chat(runner, tok, chunk: int) -> None:
    words = eval_text().split()
    replies = {}
    for cache in (False, True):
        sched = Scheduler(runner, tok, SchedulerConfig(prefill_chunk=chunk, prefix_cache=cache))
        messages, ttft = [], []
        for turn in range(10):
            messages.append({"role": "user", "content": " ".join(words[110 * turn: 110 * turn + 110]) + "\nSummarize."})
            ids = sched.add([SeqSpec(tuple(tok.chat_ids(messages)), 150, GREEDY)])
            t0, first, text = time.perf_counter(), None, ""
            while sched.has_work():
                for out in sched.step():
                    first = first or time.perf_counter() - t0
                    text += out.text if out.seq_id == ids[0] else ""
            ttft.append(first)
            messages.append({"role": "assistant", "content": text})
        replies[cache] = [m["content"] for m in messages if m["role"] == "assistant"]
        n = len(tok.chat_ids(messages))
        same = "" if not cache else f"; replies {'identical to' if replies[True] == replies[False] else 'DIFFERENT from'} cache off"
        print(f"  chat, prefix cache {'on ' if cache else 'off'}: TTFT turn 1 {ttft[0] * 1e3:.0f} ms, turn 10 "
              f"{ttft[-1] * 1e3:.0f} ms ({ttft[-1] / ttft[0]:.2f}x); {n} tokens after 10 turns{same}; all turns (ms): "
              + " ".join(f"{t * 1e3:.0f}" for t in ttft))


def returning(runner, tok, chunk: int) -> None:
    words = eval_text().split()
    firsts = [[{"role": "user", "content": f"Conversation {i}. " + " ".join(words[300 * i: 300 * i + 300]) + "\nSummarize."}]
              for i in range(32)]
    print(f"return: 32 conversations, 16 slots, first turns of {min(len(tok.chat_ids(m)) for m in firsts)}-"
          f"{max(len(tok.chat_ids(m)) for m in firsts)} tokens, replies of 16")
    for host in (0, SchedulerConfig.prefix_cache_bytes):
        sched = Scheduler(runner, tok, SchedulerConfig(prefill_chunk=chunk, prefix_cache_bytes=host))
        seconds = {}
        for turn in (1, 2):
            t0 = time.perf_counter()
            for m in firsts:
                if turn == 2:
                    m = m + [{"role": "user", "content": "And in one line?"}]
                ids = sched.add([SeqSpec(tuple(tok.chat_ids(m)), 16, GREEDY)])
                text = ""
                while sched.has_work():
                    text += "".join(o.text for o in sched.step() if o.seq_id == ids[0])
                if turn == 1:
                    m.append({"role": "assistant", "content": text})
            seconds[turn], stats = time.perf_counter() - t0, sched.take_stats()
        for m in firsts:
            del m[1:]
        print(f"  second turns, host tier {host >> 20} MiB: {stats.prompt_tokens} prompt tokens prefilled, "
              f"{stats.cached_tokens} served from the cache, {seconds[2]:.1f} s (first turns {seconds[1]:.1f} s); "
              f"host memory used {sched.prefix.saved_bytes / 2**20:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--position-invariant", default="on", help="off, on or off,on")
    ap.add_argument("--scenarios", default="shared,chat,return")
    a = ap.parse_args()
    folder = ensure_quantized_default()
    for mode in a.position_invariant.split(","):
        runner = ModelRunner(folder, RunnerConfig(device="cpu", num_slots=16, max_seq_len=4096, batch_invariant=True,
                                                  position_invariant=mode.strip() == "on"))
        print(f"{runner.backend.name} backend, position_invariant {runner.position_invariant}, prefill chunk {a.prefill_chunk}:")
        tok = Tokenizer(folder, runner.cfg.eos_token_ids)
        scenarios = {"shared": shared, "chat": chat, "return": returning}
        for name in a.scenarios.split(","):
            scenarios[name.strip()](runner, tok, a.prefill_chunk)


if __name__ == "__main__":
    main()
