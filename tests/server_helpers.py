"""Helpers for the server tests: a real `python -m tinyserve serve` process on a free loopback port, and an SSE reader."""

import json
import os
from contextlib import contextmanager
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m tinyserve serve --port <free> ARGS`, its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "tinyserve", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.health_codes: list[int] = []  # every /health status seen while waiting

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                code = requests.get(self.url + "/health", timeout=5).status_code
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            self.health_codes.append(code)
            if code == 200:
                return
            time.sleep(0.02)
        self.proc.kill()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status (SIGKILL and an error if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not exit within {timeout} s of SIGTERM:\n{self.log()[-3000:]}")
        finally:
            self._log.close()


@contextmanager
def running_server(args: list[str], log_path: Path):
    """A ready server for a test module; on the way out it must exit 0 on SIGTERM."""
    srv = ServerProcess(args, log_path)
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.terminate() == 0


def openai_client(srv: ServerProcess):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


class Http(requests.Session):
    """requests with a base URL and default headers."""

    def __init__(self, base: str, headers: dict | None = None, timeout: float = 120):
        super().__init__()
        self.base, self.timeout = base, timeout
        self.headers.update(headers or {})

    def request(self, method, url, **kw):
        kw.setdefault("timeout", self.timeout)
        return super().request(method, self.base + url, **kw)


def parse_sse(text: str) -> list:
    """An SSE body -> its events in order: a parsed JSON object, the string "[DONE]", or ("comment", text)."""
    events = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append(("comment", line[1:].strip()))
            elif line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def is_openai_error(body: dict) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(err, dict)
        and set(err) == {"message", "type", "param", "code"}
        and isinstance(err["message"], str)
        and err["message"]
        and isinstance(err["type"], str)
        and "Traceback" not in err["message"]
    )
