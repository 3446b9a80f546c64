#!/usr/bin/env python
"""Serving benchmark: N streaming requests at 1, 4 and 16 concurrent clients against a tinyserve server.

    python scripts/bench_server.py                      # starts `python -m tinyserve serve` (default INT4 model)
    python scripts/bench_server.py --url http://host:8000 --concurrency 1,16,64
    python scripts/bench_server.py --formats free,json --concurrency 1,16   # JSON-schema output vs free chat

Every level sends the same requests: /v1/completions, temperature 0, a different ~100-token Botchan passage each
(held-out prose, so the model keeps going to max_tokens), streamed with usage. Reported per level: total output
tokens/s (all completion tokens / wall time of the level), time to first token p50/p95, inter-token latency p50/p95
(gaps between content chunks as the client sees them), errors; and the ratio of tokens/s to the first level, from the
same run (these machines are noisy: compare ratios).

--formats: chat requests instead ("Describe this passage" + the passage), each level run once per format, in turn:
free (plain chat) and json (response_format json_schema, SCHEMA below); each row's ratio is to the first format's
row at the same level.
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# summary's minLength keeps the JSON going to max_tokens, as free text does: both rows time the same token counts
SCHEMA = {"type": "object", "properties": {
    "summary": {"type": "string", "minLength": 400}, "characters": {"type": "array", "items": {"type": "string"}},
    "mood": {"enum": ["happy", "sad", "angry", "calm", "mixed"]}, "quotes": {"type": "array", "items": {"type": "string"}}},
    "required": ["summary", "characters", "mood", "quotes"], "additionalProperties": False}


@dataclass
class Result:
    ok: bool
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


def passages(count: int, words: int = 75) -> list[str]:
    """`count` distinct passages of about `words` words (~100 tokens) from the evaluation slice of Botchan."""
    from tinyserve_quantize.text_data import eval_text

    tokens = eval_text().split()
    step = max(words, (len(tokens) - words) // count)
    return [" ".join(tokens[i * step : i * step + words]) for i in range(count)]


def request_body(prompt: str, max_tokens: int, fmt: str | None) -> tuple[str, dict]:
    """(path, body) of one benchmark request; fmt None: /v1/completions, else chat ("free" or "json")."""
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if fmt is None:
        return "/v1/completions", {**body, "prompt": prompt}
    body["messages"] = [{"role": "user", "content": "Describe this passage:\n\n" + prompt}]
    if fmt == "json":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "passage", "schema": SCHEMA, "strict": True}}
    return "/v1/chat/completions", body


async def one_request(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, model: str | None,
                      fmt: str | None = None) -> Result:
    path, body = request_body(prompt, max_tokens, fmt)
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    last, res = None, Result(ok=False)
    try:
        async with session.post(url + path, json=body) as r:
            if r.status != 200:
                return Result(ok=False, error=f"HTTP {r.status}: {(await r.text())[:200]}")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    res.ok = res.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = event["error"]["message"]
                    continue
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.gaps.append(now - last)
                        last = now
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_level(url: str, prompts: list[str], concurrency: int, max_tokens: int, model: str | None,
                    fmt: str | None = None) -> dict:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[Result] = []
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker():
            while not queue.empty():
                results.append(await one_request(session, url, queue.get_nowait(), max_tokens, model, fmt))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    good = [r for r in results if r.ok]
    ttft = sorted(r.ttft for r in good if r.ttft is not None)
    gaps = sorted(g for r in good for g in r.gaps)
    tokens = sum(r.tokens for r in good)
    return {
        "concurrency": concurrency,
        "format": fmt,
        "requests": len(results),
        "errors": len(results) - len(good),
        "error_examples": [r.error for r in results if not r.ok][:3],
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "itl_p50_ms": pct(gaps, 50) * 1e3,
        "itl_p95_ms": pct(gaps, 95) * 1e3,
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tinyserve", "serve", "--port", str(port), "--num-slots", str(max(args.levels)),
           "--max-waiting", str(max(64, args.requests))]
    if args.model:
        cmd += ["--model", args.model]
    cmd += args.server_arg
    print("starting:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if not args.server_log else open(args.server_log, "wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1800  # the first run may quantize the default model
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not become ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--model", help="model folder for the server this script starts (default: serve's default)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (default 32)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for `serve` (repeatable)")
    ap.add_argument("--server-log", help="write the started server's output here")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--formats", help="chat requests in these output formats, in turn per level: free, json (e.g. free,json)")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    formats = args.formats.split(",") if args.formats else [None]
    if any(f not in (None, "free", "json") for f in formats):
        ap.error("--formats takes free and/or json")

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        model = get_json(url + "/v1/models")["data"][0]["id"]
        prompts = passages(args.requests)
        for fmt in formats:
            asyncio.run(run_level(url, prompts[: args.warmup], 1, args.max_tokens, model, fmt))
        rows = []
        for c in args.levels:
            for fmt in formats:
                row = asyncio.run(run_level(url, prompts, c, args.max_tokens, model, fmt))
                rows.append(row)
                print(f"concurrency {c} {fmt or ''}: {row['tokens_per_s']:.1f} tok/s, errors {row['errors']}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)

    print(f"model {model}; {args.requests} requests per level, ~100-token prompts, max_tokens {args.max_tokens}, "
          f"temperature 0, streaming; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    if args.formats:
        print("| clients | format | output tok/s | vs first format | TTFT p50 / p95 (s) | inter-token p50 / p95 (ms) | errors |")
        print("|---:|---|---:|---:|---:|---:|---:|")
    else:
        print("| clients | output tok/s | vs 1st level | TTFT p50 / p95 (s) | inter-token p50 / p95 (ms) | errors |")
        print("|---:|---:|---:|---:|---:|---:|")
    for k, r in enumerate(rows):
        base = rows[k - k % len(formats)]["tokens_per_s"] if args.formats else rows[0]["tokens_per_s"]
        fmt = f" {r['format']} |" if args.formats else ""
        print(f"| {r['concurrency']} |{fmt} {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | {r['itl_p50_ms']:.1f} / {r['itl_p95_ms']:.1f} | {r['errors']} |")
    for r in rows:
        if r["errors"]:
            print(f"errors at {r['concurrency']} clients, e.g.: {r['error_examples']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "args": vars(args), "levels": rows}, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


if __name__ == "__main__":
    sys.exit(main())
