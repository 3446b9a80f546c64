"""The quantization report written next to the weights: quantization_report.json and quantization_report.png.

JSON: {"summary": {...}, "layers": [one row per linear]}. A row (AWQ) holds the layer's name and shape, the chosen
alpha of its scaling group (null: left unscaled), the mean clip ratio and share of clipped groups, the held-out output
MSE per output element of RTN and of AWQ (same tokens, original input space), the share of activation mass in the
top 1% of its input channels, and its bytes in fp16 and packed; a linear the gate tested also holds gate ("kept", or
"unclipped" / "rtn" when the gate gave its sub-block that candidate's weights, whose numbers the row then shows).
GPTQ and AWQ + GPTQ rows hold mse_rtn and mse_gptq (the same held-out error of their weights), the damping used and
the count of dead input channels (and, for AWQ + GPTQ, alpha).
PNG: the per-linear output MSE of RTN and of the method on a log scale (drawn when rows have both).
"""

import json
from pathlib import Path

JSON_FILE = "quantization_report.json"
PNG_FILE = "quantization_report.png"


def write_report(folder: Path, summary: dict, rows: list[dict]) -> None:
    folder = Path(folder)
    (folder / JSON_FILE).write_text(json.dumps({"summary": summary, "layers": rows}, indent=1) + "\n")
    for key, label in (("mse_awq", "AWQ"), ("mse_gptq", summary.get("method", "gptq").upper())):
        if rows and all("mse_rtn" in r and key in r for r in rows):
            plot_errors(rows, folder / PNG_FILE, title=summary.get("title", ""), key=key, label=label)


def plot_errors(rows: list[dict], path: Path, title: str = "", key: str = "mse_awq", label: str = "AWQ") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) / 12), 4.5), dpi=100)
    ax.semilogy(x, [r["mse_rtn"] for r in rows], ".-", lw=0.8, ms=3, label="RTN")
    ax.semilogy(x, [r[key] for r in rows], ".-", lw=0.8, ms=3, label=label)
    layers = [r.get("layer", 0) for r in rows]
    starts = [i for i in x if i == 0 or layers[i] != layers[i - 1]]
    ax.set_xticks(starts[:: max(1, len(starts) // 30)])
    ax.set_xticklabels([str(layers[i]) for i in starts[:: max(1, len(starts) // 30)]], fontsize=7)
    ax.set_xlabel("decoder block (each point one linear, in block order)")
    ax.set_ylabel("held-out output MSE per output")
    ax.set_title(title or f"per-linear output error, RTN vs {label}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
