"""Quantize one model on each device and compare time and memory: the numbers issue 17 asks for when a GPU is lent.

    python scripts/bench_quantize_device.py --model DIR [--method awq] [--group-size 128] [--devices cpu cuda]
                                            [--n-samples 128] [-- extra quantizer arguments]

Each device runs `python -m tinyserve_quantize ... --device D` in its own process (so peak RSS is that run's) into a
temporary folder, then prints one row per device from its quantization_report.json: quantization and wall seconds,
peak RSS, peak GPU memory, and the sha256 of the weights (the same bytes or not).
"""

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--method", default="awq")
    p.add_argument("--group-size", default="128")
    p.add_argument("--n-samples", default="128")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    p.add_argument("extra", nargs="*", help="more arguments for python -m tinyserve_quantize (after --)")
    a = p.parse_args()
    print("| device | quantize s | wall s | peak RSS GiB | peak GPU GiB | weights sha256 |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for device in a.devices:
            out = Path(tmp) / device
            cmd = [sys.executable, "-m", "tinyserve_quantize", "--model", str(a.model), "--out", str(out), "--method", a.method,
                   "--group-size", a.group_size, "--n-samples", a.n_samples, "--device", device, *a.extra]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                print(f"| {device} | failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode} | | | | |", flush=True)
                continue
            s = json.loads((out / "quantization_report.json").read_text())["summary"]
            digest = hashlib.sha256()
            for f in sorted(out.glob("*.safetensors")):
                digest.update(f.read_bytes())
            print(f"| {device} | {s['quantize_seconds']} | {s['wall_seconds']} | {s['peak_rss_gib']} | {s.get('peak_gpu_gib', '')} | "
                  f"{digest.hexdigest()[:16]} |", flush=True)


if __name__ == "__main__":
    main()
