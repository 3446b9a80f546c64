"""Calibration: text -> token windows -> per-block inputs -> per-linear input statistics.

The model is never run whole on the calibration set. Layer 0's inputs are captured once (the model stops there), then
each decoder block runs on its captured inputs, in chunks of windows, and its outputs become the next block's
inputs: only one block's inputs and outputs are held at a time.

While a block runs, hooks on one linear per distinct input ("site") accumulate what the searches need:
- x_mean [K]: mean |x| per input channel (AWQ's saliency signal), on the fit windows;
- H [K, K] = X^T X / T: the Gram matrix of the inputs. For any weight error dW [N, K], the mean squared output error
  over the T calibration tokens is tr(dW H dW^T) / N, so every candidate in the scale and clip searches is scored on
  *all* calibration tokens at a cost that does not grow with T.
Windows are split into a fit set (used to choose scales and clips) and a held-out set (every `holdout_every`-th
window), on which each choice must beat "no scaling" / "no clipping" to be kept.
"""

from dataclasses import dataclass

import torch
from torch import nn

from tinyserve_quantize.value_stats import ValueSite, value_gram


class CalibrationError(ValueError):
    """The calibration text cannot give what was asked; the message says why."""


def calibration_windows(tokenizer, texts: str | list[str], n_samples: int, seqlen: int, log=print) -> torch.Tensor:
    """Text(s) -> [B, seqlen] token ids: non-overlapping windows of the concatenated text, no BOS.

    When the text holds more than n_samples windows they are spread evenly over it; when it holds fewer, all of them
    are used and a message says so (the built-in Botchan slice gives 84 windows of 512 tokens, not the 128 asked for
    by default).
    """
    if isinstance(texts, str):
        texts = [texts]
    ids = tokenizer("\n\n".join(t for t in texts if t.strip()), add_special_tokens=False).input_ids
    available = len(ids) // seqlen
    if available == 0:
        raise CalibrationError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seqlen}")
    if available < n_samples:
        log(f"calibration: the text gives {available} windows of {seqlen} tokens ({available * seqlen:,} tokens); using all of them (asked for {n_samples})")
        picks = list(range(available))
    else:
        picks = [round(i * available / n_samples) for i in range(n_samples)]
    windows = torch.tensor(ids[: available * seqlen]).view(available, seqlen)
    return windows[picks]


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, dict]:
    """Run the model up to layer 0 on every window. Returns its hidden-state inputs [B, S, H] (fp32) and the keyword
    arguments the model passes to every block (rotary position_embeddings, attention_mask, position_ids), which do not
    depend on the window's content and broadcast over a batch of windows."""
    captured: list[torch.Tensor] = []
    kwargs: dict = {}

    def hook(module, args, kw):
        captured.append((args[0] if args else kw["hidden_states"]).float())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values", "use_cache", "cache_position")})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(windows), chunk):
            try:
                model(input_ids=windows[i : i + chunk], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(captured), kwargs


@dataclass
class SiteStats:
    """Input statistics of one linear input, normalised per token."""

    x_mean: torch.Tensor  # [K] mean |x| over the fit tokens
    H_fit: torch.Tensor  # [K, K] X^T X / T over the fit tokens
    H_val: torch.Tensor  # [K, K] the same over the held-out tokens
    tokens_fit: int
    tokens_val: int
    # [kv_heads, K, K] at q/k/v's input: the attention-averaged inputs' Gram per key/value head, over the fit tokens
    # (value_stats.py): the Hessian of v_proj's rows
    H_value: torch.Tensor | None = None


def cast(obj, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """A block's keyword arguments (tensors, tuples of them, anything else) -> tensors on device, floating ones in
    dtype (None: unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else None)
    if isinstance(obj, tuple):
        return tuple(cast(o, dtype, device) for o in obj)
    return obj


GRAM_BLOCK = 1024  # rows of X^T X per GEMM; only blocks on or right of the diagonal are computed


def _add_gram_upper(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """acc [K, K] fp32 (None: zeros) += the block upper triangle of x^T x, x [T, K]; _mirror_upper completes it.

    X^T X is symmetric, so each row block [a0:a1] is multiplied only against columns a0: (about 60% of the full
    product's flops at K = 4864). Each bf16 x bf16 block accumulates in fp32 inside the GEMM, rounds to bf16 like the
    full product's entries, and is summed into acc in fp32. (Blocks of 512 were 5-20% faster, but on SmolLM2's real
    K = 576 inputs some entries came out different from the whole product's, which moved GPTQ's roundings.)"""
    K = x.shape[1]
    acc = torch.zeros(K, K) if acc is None else acc
    for a0 in range(0, K, GRAM_BLOCK):
        a1 = min(a0 + GRAM_BLOCK, K)
        acc[a0:a1, a0:].add_(x[:, a0:a1].t() @ x[:, a0:])
    return acc


def _mirror_upper(acc: torch.Tensor | None) -> torch.Tensor | None:
    """Copy _add_gram_upper's blocks right of the diagonal onto those below it, in place."""
    if acc is None:
        return None
    K = acc.shape[0]
    for a0 in range(0, K, GRAM_BLOCK):
        a1 = min(a0 + GRAM_BLOCK, K)
        acc[a1:, a0:a1] = acc[a0:a1, a1:].t()
    return acc


@torch.no_grad()
def run_block(
    block: nn.Module,
    inputs: torch.Tensor,
    block_kwargs: dict,
    sites: dict[str, nn.Module],
    holdout_every: int = 4,
    token_stride: int = 1,
    chunk: int = 8,
    value: ValueSite | None = None,
    outputs: bool = True,
) -> tuple[torch.Tensor | None, dict[str, SiteStats]]:
    """Run one decoder block on inputs [B, S, H] (in the block's dtype) and collect SiteStats for every site.

    sites: name -> linear module whose *input* is recorded, in the order the block reads them. token_stride > 1 uses
    every stride-th token for the Gram matrices (x_mean always sees every fit token). Returns (outputs [B, S, H] fp32,
    stats). value: the block's attention (value_stats.ValueSite): its site's stats get H_value.
    outputs=False: the block stops once the last site's input is recorded (the down_proj GEMM and the residual are
    skipped) and no outputs are returned, for callers that make the next block's inputs another way.
    """
    dtype = next(block.parameters()).dtype
    kw = {k: cast(v, dtype) for k, v in block_kwargs.items()}
    B = inputs.shape[0]
    val_ids = [i for i in range(B) if holdout_every and i % holdout_every == holdout_every - 1]
    fit_ids = [i for i in range(B) if i not in set(val_ids)] or val_ids
    acc = {name: {"abs": 0.0, "fit": None, "val": None, "n_abs": 0, "n_fit": 0, "n_val": 0, "value": None, "n_value": 0}
           for name in sites}
    split = {"now": "fit"}
    seen: dict[str, torch.Tensor] = {}  # value: the attention's input [B, S, K] and q_proj's output of the current chunk

    def make_hook(name):
        def hook(module, args):
            if value is not None and name == value.site and split["now"] == "fit":
                seen["x"] = args[0]
            x = args[0].flatten(0, -2)  # [T, K]
            a = acc[name]
            if split["now"] == "fit":
                a["abs"] = a["abs"] + x.abs().sum(0, dtype=torch.float32)
                a["n_abs"] += x.shape[0]
            xs = x[::token_stride]
            a[split["now"]] = _add_gram_upper(a[split["now"]], xs)
            a["n_" + split["now"]] += xs.shape[0]
            if name == last:
                raise _Stop

        return hook

    def keep_q(module, args, out):
        if split["now"] == "fit":
            seen["q"] = out

    def value_hook(module, args, out):  # k_proj runs after q_proj: the attention weights can be computed now
        if split["now"] == "fit":
            a = acc[value.site]
            gram = value_gram(seen.pop("x"), seen.pop("q"), out, kw["position_embeddings"], value.shape)
            a["value"] = gram if a["value"] is None else a["value"].add_(gram)
            a["n_value"] += out.shape[0] * out.shape[1] * (value.shape.heads // value.shape.kv_heads)

    last = None if outputs or not sites else list(sites)[-1]
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in sites.items()]
    if value is not None:
        handles += [value.q.register_forward_hook(keep_q), value.k.register_forward_hook(value_hook)]
    result = torch.empty(inputs.shape, dtype=torch.float32) if last is None else None
    try:
        for part, ids in (("fit", fit_ids), ("val", val_ids)):
            split["now"] = part
            for i in range(0, len(ids), chunk):
                idx = ids[i : i + chunk]
                try:
                    out = block(inputs[idx].to(dtype), **kw)
                except _Stop:
                    continue
                result[idx] = (out[0] if isinstance(out, tuple) else out).float()
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for name, a in acc.items():
        H_fit = _mirror_upper(a["fit"]) / max(a["n_fit"], 1)
        H_val = _mirror_upper(a["val"]) / a["n_val"] if a["n_val"] else H_fit
        H_value = a["value"] / a["n_value"] if a["value"] is not None else None
        stats[name] = SiteStats(a["abs"] / max(a["n_abs"], 1), H_fit, H_val, a["n_fit"], a["n_val"], H_value)
    return result, stats
