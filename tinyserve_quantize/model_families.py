"""Which model families the quantizer knows, as a small table instead of per-model code.

A decoder block is described by its scaling groups: a "previous op" whose output feeds a set of linears that all read
the same input. AWQ multiplies the linears' input channels by s and folds 1/s into the previous op, which must be a
norm (weight [K]) or a linear (output rows [K]) so the fold is exact. Llama and Qwen2 share one table; Qwen2's
biases on q/k/v need no special case (scaling input channels leaves a bias alone).
"""

from dataclasses import dataclass

from tinyserve_quantize.quantizer import QuantizationError


@dataclass(frozen=True)
class ScalingGroup:
    prev: str | None  # module path inside a block of the op whose output feeds `linears`; None: nothing to fold into
    linears: tuple[str, ...]  # paths inside a block; all read the same input
    # A linear prev absorbs 1/s exactly when its out_features equals the linears' in_features. Under grouped-query
    # attention v_proj has fewer outputs than o_proj has inputs: then each v channel's scale is shared by the o_proj
    # channels that read it (awq.SearchConfig.gqa_vo, on by default), or the group is left unscaled.
    needs_matching_shapes: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    layers: str  # path of the ModuleList of decoder blocks inside the *ForCausalLM model
    groups: tuple[ScalingGroup, ...]
    no_clip: tuple[str, ...]  # linears whose clip search is skipped: q/k errors pass through softmax, not linearly
    norm: str = "model.norm"  # the final norm before the output head
    attention: str = "self_attn"  # the attention module inside a block (its q_proj, k_proj and v_proj)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)


_DECODER_GROUPS = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), needs_matching_shapes=True),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
)
_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")

FAMILIES = {
    "llama": Family("llama", ("LlamaForCausalLM",), "model.layers", _DECODER_GROUPS, _NO_CLIP),
    "qwen2": Family("qwen2", ("Qwen2ForCausalLM",), "model.layers", _DECODER_GROUPS, _NO_CLIP),
}


def sub_blocks(family: Family) -> list[tuple[str, tuple[str, ...]]]:
    """[(linear prefix inside a block, the norms that feed it)]: ("self_attn.", ("input_layernorm",)), ("mlp.", ...).
    A sub-block holds every op its scaling groups fold into, so it can be swapped as a whole (clip_gate.py)."""
    out: dict[str, list[str]] = {}
    for g in family.groups:
        prefix = g.linears[0].split(".")[0] + "."
        norms = out.setdefault(prefix, [])
        if g.prev is not None and g.prev not in family.linears and g.prev not in norms:
            norms.append(g.prev)
    return [(prefix, tuple(norms)) for prefix, norms in out.items()]


def supported() -> str:
    return ", ".join(f"{a} (model_type {k!r})" for k, f in FAMILIES.items() for a in f.architectures)


def family_for(config: dict) -> Family:
    """config.json as a dict -> its Family; an unknown architecture is an error listing the supported ones."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    family = FAMILIES.get(model_type)
    if family is None or (archs and not set(archs) & set(family.architectures)):
        what = f"architecture {archs[0]!r}" if archs else f"model_type {model_type!r}"
        raise QuantizationError(f"unsupported {what}; supported: {supported()}")
    return family
