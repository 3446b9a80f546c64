"""SIGTERM: the server stops accepting connections, lets running requests finish within --shutdown-timeout, cancels
what is left (streams get an error event and [DONE]) and exits 0. Also: /health answers 503 while the model loads."""

import json
import socket
import threading
import time
from http.client import HTTPConnection

import requests

from server_helpers import ServerProcess, parse_sse

BODY = {"messages": [{"role": "user", "content": "Tell me a long story."}], "temperature": 0}


def start(tiny_llama_dir, tmp_path, grace: float) -> ServerProcess:
    srv = ServerProcess(["--model", str(tiny_llama_dir), "--max-seq-len", "512", "--threads", "1", "--num-slots", "4",
                         "--shutdown-timeout", str(grace)], tmp_path / "server.log")
    srv.wait_ready()
    return srv


def open_stream(srv: ServerProcess, max_tokens: int) -> tuple[HTTPConnection, object, bytes]:
    """Start a streaming request and read until its first two data events; returns what was read so far."""
    conn = HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({**BODY, "max_tokens": max_tokens, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    head, events = b"", 0
    while events < 2:
        line = resp.readline()
        head += line
        events += line.startswith(b"data: ")
    return conn, resp, head


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_sigterm_finishes_running_requests_and_exits_0(tiny_llama_dir, tmp_path):
    srv = start(tiny_llama_dir, tmp_path, grace=60)
    try:
        assert 503 in srv.health_codes and srv.health_codes[-1] == 200  # listening while the model loads
        conn, resp, head = open_stream(srv, max_tokens=400)
        srv.proc.send_signal(15)
        deadline = time.monotonic() + 5
        while not refused(srv.port):  # no new connections once SIGTERM is handled
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.02)
        events = parse_sse((head + resp.read()).decode())
        conn.close()
        chunks = [e for e in events if isinstance(e, dict)]
        assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) > 2  # it went on after SIGTERM
        assert srv.proc.wait(60) == 0
        assert "shutting down" in srv.log()
    finally:
        if srv.proc.poll() is None:
            srv.terminate()


def test_sigterm_cancels_requests_past_the_grace_period(tiny_llama_dir, tmp_path):
    srv = start(tiny_llama_dir, tmp_path, grace=0)
    try:
        plain: dict = {}

        def non_streaming():
            r = requests.post(srv.url + "/v1/chat/completions", json={**BODY, "max_tokens": 450}, timeout=60)
            plain.update(status=r.status_code, body=r.json())

        t = threading.Thread(target=non_streaming)
        t.start()
        conn, resp, head = open_stream(srv, max_tokens=450)
        while requests.get(srv.url + "/health", timeout=5).json()["running"] < 2:
            time.sleep(0.01)
        srv.proc.send_signal(15)
        events = parse_sse((head + resp.read()).decode())
        conn.close()
        t.join(60)
        assert events[-1] == "[DONE]"
        assert events[-2] == {"error": {"message": "the server is shutting down", "type": "server_error", "param": None,
                                        "code": "shutting_down"}}
        assert plain["status"] == 503 and plain["body"]["error"]["code"] == "shutting_down"
        assert srv.proc.wait(60) == 0
    finally:
        if srv.proc.poll() is None:
            srv.terminate()
