"""The async front of the scheduler: submit sequences, read their outputs as an async stream.

The scheduler runs in one worker thread (model compute never blocks the event loop); after each step the worker hands
that step's outputs to the event loop in one `call_soon_threadsafe`, which routes them to the streams of their
requests. Cancelling a stream (client gone, shutdown) aborts its sequences: their KV slots are free at the start of
the next step.

    engine = Engine(runner, tokenizer, SchedulerConfig(...), metrics)
    engine.start()                                  # in the running event loop
    stream = engine.submit([SeqSpec(...), ...])     # QueueFull when the waiting queue is full
    async for index, out in stream: ...             # index: which spec; out: scheduler.Output
    stream.cancel()                                 # idempotent; the server calls it in `finally`
"""

import asyncio
import json
import logging
import threading
from collections.abc import Sequence
from functools import lru_cache

from tinyserve.server.metrics import Metrics
from tinyserve.runtime.runner import ModelRunner
from tinyserve.generation.scheduler import FinishReason, Output, Scheduler, SchedulerConfig, SeqSpec
from tinyserve.generation.tokenizer import Tokenizer

log = logging.getLogger("tinyserve.server.engine")


class RequestStream:
    """The outputs of one request's sequences, in order, as (spec index, Output); ends when all have finished."""

    def __init__(self, engine: "Engine", seq_ids: list[int]):
        self.engine = engine
        self.seq_ids = seq_ids
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.open = set(range(len(seq_ids)))  # spec indices not finished yet

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Output]:
        if not self.open:
            raise StopAsyncIteration
        index, out = await self.queue.get()
        if out.finish_reason is not None:
            self.open.discard(index)
        return index, out

    async def next(self, timeout: float | None) -> tuple[int, Output] | None:
        """The next output, or None after `timeout` seconds without one (the caller sends a keep-alive)."""
        if not self.open:
            raise StopAsyncIteration
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except asyncio.TimeoutError:
            return None

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        if self.open:
            self.engine.abort([self.seq_ids[i] for i in self.open], reason)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: SchedulerConfig = SchedulerConfig(),
                 metrics: Metrics | None = None, draft: ModelRunner | None = None):
        self.runner, self.tok = runner, tokenizer
        self.scheduler = Scheduler(runner, tokenizer, config, draft)
        self.metrics = metrics or Metrics()
        self.metrics.slots.set(runner.num_slots)
        self.pieces = TokenPieces(tokenizer)
        self._routes: dict[int, tuple[RequestStream, int]] = {}  # seq id -> (stream, spec index); event loop only
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        self._thread = threading.Thread(target=self._work, name="tinyserve-scheduler", daemon=True)
        self._thread.start()

    def submit(self, specs: Sequence[SeqSpec]) -> RequestStream:
        ids = self.scheduler.add(specs)  # QueueFull propagates
        stream = RequestStream(self, ids)
        for index, seq_id in enumerate(ids):
            self._routes[seq_id] = (stream, index)
        self._idle.clear()
        self.metrics.waiting.set(self.scheduler.num_waiting)
        with self._wake:
            self._wake.notify()
        return stream

    def abort(self, seq_ids: Sequence[int], reason: FinishReason = FinishReason.CANCELLED) -> None:
        self.scheduler.abort(seq_ids, reason)
        with self._wake:
            self._wake.notify()

    async def drain(self, timeout: float) -> bool:
        """Wait until no sequence is queued or running; False if `timeout` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def abort_all(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        self.scheduler.abort_all(reason)
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        """Stop the worker thread after its current step (sequences still running are aborted first)."""
        self.abort_all()
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # ---- worker thread ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        sched = self.scheduler
        while True:
            with self._wake:
                while not self._stopping and not sched.has_work():
                    self._wake.wait()
                if self._stopping and not sched.has_work():
                    return
            try:
                outputs = sched.step()
                self._record(outputs)
            except Exception:  # a bug, not a bad request: fail what is in flight, keep serving
                log.exception("scheduler step failed; aborting every sequence")
                sched.abort_all(FinishReason.ERROR)
                outputs = []
            idle = not sched.has_work()
            if outputs or idle:
                try:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, idle)
                except RuntimeError:  # the event loop is closed: the process is exiting
                    return

    def _record(self, outputs: list[Output]) -> None:
        m, sched = self.metrics, self.scheduler
        stats = sched.take_stats()
        m.prompt_tokens.inc(stats.prompt_tokens)
        m.cached_tokens.inc(stats.cached_tokens)
        m.draft_tokens.inc(stats.draft_tokens)
        m.accepted_tokens.inc(stats.accepted_tokens)
        m.generation_tokens.inc(sum(1 for o in outputs if o.token is not None))
        for t in stats.ttft:
            m.ttft.observe(t)
        for t in stats.inter_token:
            m.itl.observe(t)
        for reason, count in stats.finished.items():
            m.finished.labels(reason=reason.value).inc(count)
        m.running.set(sched.num_running)
        if sched.prefix is not None:
            m.prefix_host_bytes.set(sched.prefix.saved_bytes)
        m.waiting.set(sched.num_waiting)

    # ---- event loop -------------------------------------------------------------------------------------------

    def _dispatch(self, outputs: list[Output], idle: bool) -> None:
        for out in outputs:
            route = self._routes.get(out.seq_id)
            if route is None:
                continue
            stream, index = route
            stream.queue.put_nowait((index, out))
            if out.finish_reason is not None:
                del self._routes[out.seq_id]
        if idle and not self._routes:
            self._idle.set()


class TokenPieces:
    """A token id -> (its text, its bytes) on its own, as OpenAI's logprobs report it. A token that holds part of a
    UTF-8 character has bytes that do not decode; its text then shows the replacement character."""

    def __init__(self, tokenizer: Tokenizer):
        hf = tokenizer.hf
        self.hf = hf
        self.special = {i: t.content for i, t in hf.added_tokens_decoder.items()}
        decoder = json.loads(hf.backend_tokenizer.to_str()).get("decoder") or {}
        types = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self.byte_level = "ByteLevel" in types
        self.byte_of_char = {c: b for b, c in bytes_to_unicode().items()}

    @lru_cache(maxsize=65536)
    def __call__(self, token_id: int) -> tuple[str, bytes]:
        if token_id in self.special:
            raw = self.special[token_id].encode()
        else:
            piece = self.hf.convert_ids_to_tokens(token_id)
            if piece is None:
                raw = b""
            elif self.byte_level:
                raw = bytes(self.byte_of_char.get(c, 0x3F) for c in piece)
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
            else:
                raw = piece.replace("\u2581", " ").encode()
        return raw.decode("utf-8", errors="replace"), raw


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte is shown as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
