"""The smoke set scripts/check-latest runs against the newest allowed versions of every dependency (and the suite runs
against the lock): everything imports, the command lines quantize a tiny model, generate from it and serve it.

    pytest -m smoke
"""

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import ServerProcess

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tinyserve_kernels", "tinyserve_quantize", "tinyserve")

pytestmark = pytest.mark.smoke


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} exited with {r.returncode}:\n{r.stderr[-3000:]}"
    return r


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports(package):
    pkg = importlib.import_module(package)
    names = [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
    assert names
    for name in names:
        importlib.import_module(name)


@pytest.fixture(scope="module")
def rtn_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "rtn"
    run_cli("tinyserve_quantize", "--model", str(tiny_llama_dir), "--out", str(out), "--method", "rtn",
            "--group-size", "32")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    return out


def test_generate_eight_tokens(rtn_dir):
    r = run_cli("tinyserve", "generate", "--model", str(rtn_dir), "--prompt", "Hello", "--max-tokens", "8",
                "--ignore-eos", "--json")
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == 8 and len(out["token_ids"]) == 8
    assert out["finish_reason"] == "length"


def test_serve_health_and_one_chat_request(rtn_dir, tmp_path):
    from openai import OpenAI

    args = ["--model", str(rtn_dir), "--num-slots", "2", "--max-seq-len", "256"]
    server = ServerProcess(args, tmp_path / "serve.log")
    try:
        server.wait_ready()
        assert server.health_codes[-1] == 200
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        assert server.terminate() == 0
