"""Our quantized folders, single-file and sharded, as other engines read them.

vLLM and SGLang (tensor parallel, `--quantization awq` / `awq_marlin`) are not installed here and need a GPU, so their
loaders are re-enacted in `vllm_plan` from their source (vllm-project/vllm main as of 2026; SGLang's awq.py and
awq_marlin.py are ports with the same keys and shapes). Each step cites the vLLM file and function it follows:

- config: model_loader/weight_utils.py `get_quant_config` takes config.json's `quantization_config`;
  layers/quantization/awq.py `AWQConfig.from_config` reads `w_bit`|`bits`, `q_group_size`|`group_size`, `zero_point`,
  `modules_to_not_convert` (`version` is not read); awq_marlin.py `AWQMarlinConfig.is_awq_marlin_compatible` wants
  `quant_method` "awq", `bits`, `group_size`, `zero_point` and a Marlin group size.
- files: model_loader/default_loader.py `DefaultModelLoader._prepare_weights` globs `*.safetensors`, then
  weight_utils.py `filter_duplicate_safetensors_files` keeps only the files model.safetensors.index.json names.
- names: models/llama.py and qwen2.py `load_weights`: q/k/v -> qkv_proj, gate/up -> gate_up_proj
  (`stacked_params_mapping`), `params_dict[name]` (a KeyError for any other name), `lm_head.` skipped when tied.
- shapes and TP: awq.py `AWQLinearMethod.create_weights` (qweight [K_p, N_p / 8] int32, qzeros [K_p / G, N_p / 8]
  int32, scales [K_p / G, N_p] in the model dtype; raises unless K_p % G == 0 and N_p % 8 == 0 per rank);
  parameter.py `_ColumnvLLMParameter.load_qkv_weight` / `load_merged_column_weight` (each q/k/v or gate/up slice is
  cut at shard_size / pack_factor words); llama.py `LlamaAttention.__init__` (heads % tp, kv heads % tp or tp % kv);
  quantization/utils/marlin_utils.py `verify_marlin_supports_shape` (N_p % 64, K_p % 128; a layer that fails falls
  back to the AWQ kernel, awq_marlin.py `AWQMarlinConfig.get_quant_method`).
- skips: awq.py `AWQConfig.maybe_update_config` (with no modules_to_not_convert, every module whose tensors are all
  float is left unquantized) and quant_utils.py `is_layer_skipped` (substring match).

transformers loads AWQ folders only through the gptqmodel package (quantizers/quantizer_awq.py
`AwqQuantizer.validate_environment`), which is not installed here: for transformers the sharded *fake-quant* folder
(plain fp16, the same ShardWriter) is loaded and compared, and the packed folder's index is resolved with
transformers' own `get_checkpoint_shard_files`.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinyserve.runtime.runner import ModelRunner, RunnerConfig
from tinyserve_quantize.__main__ import parse_args
from tinyserve_quantize.export import INDEX_FILE, SHARD_BYTES, WEIGHTS_FILE, write_tensors
from tinyserve_quantize.pipeline import QuantizeConfig, run
from tinyserve_quantize.quantizer import QuantizationError

PACK = 8  # awq.py AWQConfig.pack_factor = 32 // weight_bits
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_MIN_N, MARLIN_MIN_K = 64, 128  # marlin_utils.py GPTQ_MARLIN_MIN_THREAD_N / GPTQ_MARLIN_MIN_THREAD_K
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # awq.py maybe_update_config's unquant_dtypes
SHARD = 100_000  # bytes: splits the tiny models into many shards, q/k/v and gate/up of a layer across files
IDS = torch.randint(0, 49152, (24,), generator=torch.Generator().manual_seed(11))

# Qwen2.5-Coder-0.5B-Instruct's config.json (the same shapes as Qwen2.5-0.5B).
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936, "tie_word_embeddings": True}


def get_from_keys(qc: dict, keys: list[str]):
    """base_config.py QuantizationConfig.get_from_keys: the first key present, else an error."""
    for k in keys:
        if k in qc:
            return qc[k]
    raise KeyError(f"quantization_config has none of {keys}")


@dataclass
class Linear:
    """One vLLM linear (fused as vLLM builds it): the unfused parts on disk and the sizes one TP rank holds."""

    parts: dict[str, int]  # unfused name -> N on disk (q_proj: heads * head_dim, ...)
    k: int  # input size on disk
    k_rank: int  # input size per rank (split for row-parallel o_proj / down_proj)
    n_rank: dict[str, int]  # unfused name -> N per rank (split for column-parallel qkv / gate_up)
    bias: bool


@dataclass
class Plan:
    errors: list[str] = field(default_factory=list)  # what would make vLLM refuse the folder or load it wrongly
    marlin: dict[str, bool] = field(default_factory=dict)  # fused linear -> runs the Marlin kernel (else AWQ's)


def linears(cfg: dict, tp: int, errors: list[str]) -> dict[str, Linear]:
    """The four quantized linears of a Llama / Qwen2 block as vLLM builds them at tensor-parallel size tp
    (llama.py LlamaAttention / LlamaMLP, qwen2.py Qwen2Attention / Qwen2MLP; linear.py divide() on each split)."""
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or H // nh
    if nh % tp:
        errors.append(f"num_attention_heads {nh} is not divisible by tp {tp}")
    if (nkv >= tp and nkv % tp) or (nkv < tp and tp % nkv):
        errors.append(f"num_key_value_heads {nkv} neither divides nor is divided by tp {tp}")
    if I % tp:
        errors.append(f"intermediate_size {I} is not divisible by tp {tp}")
    qwen2 = cfg["model_type"] == "qwen2"
    qkv_bias = True if qwen2 else bool(cfg.get("attention_bias", False))
    o_bias = False if qwen2 else bool(cfg.get("attention_bias", False))
    mlp_bias = False if qwen2 else bool(cfg.get("mlp_bias", False))
    q_rank, kv_rank = nh // tp * hd, max(1, nkv // tp) * hd  # kv heads are replicated when tp > nkv
    return {
        "self_attn.qkv_proj": Linear({"q_proj": nh * hd, "k_proj": nkv * hd, "v_proj": nkv * hd}, H, H,
                                     {"q_proj": q_rank, "k_proj": kv_rank, "v_proj": kv_rank}, qkv_bias),
        "self_attn.o_proj": Linear({"o_proj": H}, nh * hd, nh * hd // tp, {"o_proj": H}, o_bias),
        "mlp.gate_up_proj": Linear({"gate_proj": I, "up_proj": I}, H, H,
                                   {"gate_proj": I // tp, "up_proj": I // tp}, mlp_bias),
        "mlp.down_proj": Linear({"down_proj": H}, I, I // tp, {"down_proj": H}, mlp_bias),
    }


def tp_plan(cfg: dict, group_size: int, tp: int, marlin_config_ok: bool = True) -> Plan:
    """The per-rank shape conditions alone (no files): which linears load at all, which run Marlin."""
    plan = Plan()
    for fused, lin in linears(cfg, tp, plan.errors).items():
        G = lin.k if group_size == -1 else group_size  # create_weights normalizes -1 to the whole input
        n_rank = sum(lin.n_rank.values())
        # awq.py AWQLinearMethod.create_weights: hard errors for either kernel (awq_marlin falls back to it).
        if lin.k_rank % G:
            plan.errors.append(f"{fused}: input size per rank {lin.k_rank} is not divisible by group size {G}")
        for part, n in lin.n_rank.items():  # parameter.py: each slice is cut at n / pack_factor int32 words
            if n % PACK:
                plan.errors.append(f"{fused}: {part}'s {n} outputs per rank are not whole int32 words")
        # marlin_utils.py verify_marlin_supports_shape (via check_marlin_supports_layer).
        plan.marlin[fused] = (marlin_config_ok and n_rank % MARLIN_MIN_N == 0 and lin.k_rank % MARLIN_MIN_K == 0
                              and (G >= lin.k or lin.k_rank % G == 0))
    return plan


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors vLLM would iterate: default_loader.py _prepare_weights + filter_duplicate_safetensors_files."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / INDEX_FILE
    problems = []
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [f for f in files if f.name in set(weight_map.values())]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for name in h.keys():
                if name in tensors:
                    problems.append(f"{name} is in more than one weights file")
                tensors[name] = h.get_tensor(name)
    if index.is_file() and weight_map.keys() != tensors.keys():
        problems.append(f"the index and the shards disagree on {sorted(weight_map.keys() ^ tensors.keys())[:3]}")
    if not tensors:
        problems.append("no safetensors weights")
    return tensors, problems


def vllm_plan(folder: Path, tp: int) -> Plan:
    """What vLLM's awq / awq_marlin loaders would make of `folder` at tensor-parallel size tp."""
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if qc is None:
        return Plan(errors=["config.json has no quantization_config"])
    errors = []
    try:
        bits = get_from_keys(qc, ["w_bit", "bits"])
        G = get_from_keys(qc, ["q_group_size", "group_size"])
        zero_point = get_from_keys(qc, ["zero_point"])
    except KeyError as e:
        return Plan(errors=[str(e)])
    if str(qc.get("quant_method", "")).lower() != "awq":
        errors.append(f"quant_method {qc.get('quant_method')!r} is not awq")
    if bits != 4:  # AWQConfig.__init__; AWQMarlinConfig.TYPE_MAP = {4: uint4}
        errors.append(f"bits {bits}: vLLM's AWQ loads 4-bit weights only")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")  # config/model.py _find_dtype (torch_dtype, alias dtype)
    if dtype != "float16":  # AWQConfig.get_supported_act_dtypes: [half] (awq_marlin: half and bfloat16)
        errors.append(f"dtype {dtype}: the awq kernel computes in float16")
    # awq_marlin.py is_awq_marlin_compatible: uint4 with runtime zero points, a Marlin group size.
    marlin_ok = (all(k in qc for k in ("bits", "group_size", "zero_point")) and bool(zero_point)
                 and G in MARLIN_GROUP_SIZES)
    plan = tp_plan(cfg, G, tp, marlin_ok)
    plan.errors[:0] = errors

    tensors, problems = read_folder(folder)
    plan.errors += problems
    lin = linears(cfg, 1, [])  # full (on-disk) shapes
    L, H, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings", False))
    # vLLM's parameters (LlamaForCausalLM / Qwen2ForCausalLM) and, for each, the unfused tensors that fill it.
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed_tokens.weight": ((V, H), torch.float16),
                                                                 "model.norm.weight": ((H,), torch.float16)}
    if not tied:
        expected["lm_head.weight"] = ((V, H), torch.float16)
    linear_prefixes = []  # every quantized linear as stored (unfused): model.layers.0.self_attn.q_proj, ...
    for i in range(L):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected[f"model.layers.{i}.{norm}.weight"] = ((H,), torch.float16)
        for fused, linear in lin.items():
            Gk = linear.k if G == -1 else G
            for part, n in linear.parts.items():
                prefix = f"model.layers.{i}.{fused.rsplit('.', 1)[0]}.{part}"
                linear_prefixes.append(prefix)
                expected[f"{prefix}.qweight"] = ((linear.k, n // PACK), torch.int32)
                expected[f"{prefix}.qzeros"] = ((linear.k // Gk, n // PACK), torch.int32)
                expected[f"{prefix}.scales"] = ((linear.k // Gk, n), torch.float16)
                if linear.bias:
                    expected[f"{prefix}.bias"] = ((n,), torch.float16)
    for name, t in tensors.items():
        if "rotary_emb.inv_freq" in name or (tied and name.startswith("lm_head.")):
            continue  # load_weights / AutoWeightsLoader(skip_prefixes=["lm_head."]) skip these
        if name not in expected:
            plan.errors.append(f"{name}: no such vLLM parameter (params_dict KeyError, or a bias silently dropped)")
        elif (tuple(t.shape), t.dtype) != expected[name]:
            shape, dtype = expected[name]
            plan.errors.append(f"{name}: {tuple(t.shape)} {t.dtype}, vLLM expects {shape} {dtype}")
    missing = expected.keys() - tensors.keys()
    if missing:  # DefaultModelLoader.load_weights checks this only for unquantized models: garbage otherwise
        plan.errors.append(f"never loaded: {sorted(missing)[:3]}")
    skipped = qc.get("modules_to_not_convert") or []
    if not skipped:  # AWQConfig.maybe_update_config
        modules = {n.rsplit(".", 1)[0] for n in tensors}
        quantized = {n.rsplit(".", 1)[0] for n, t in tensors.items() if t.dtype not in FLOAT_DTYPES}
        skipped = sorted(modules - quantized)
    for prefix in linear_prefixes:  # is_layer_skipped(..., skip_with_substr=True)
        if any(s in prefix for s in skipped):
            plan.errors.append(f"{prefix} would be loaded as an unquantized linear (modules_to_not_convert)")
    return plan


def quantize(src: Path, out: Path, group_size: int = 32, **kw) -> Path:
    run(QuantizeConfig(src, out, method="rtn", group_size=group_size, **kw), log=lambda m: None, progress=False)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    """RTN g32 folders of one tiny model: packed single-file, packed sharded, fake-quant single-file and sharded."""
    base = tmp_path_factory.mktemp("serving")
    return {
        "single": quantize(tiny_model_dir, base / "single"),
        "sharded": quantize(tiny_model_dir, base / "sharded", max_shard_bytes=SHARD),
        "fake-single": quantize(tiny_model_dir, base / "fake-single", fake=True),
        "fake-sharded": quantize(tiny_model_dir, base / "fake-sharded", fake=True, max_shard_bytes=SHARD),
    }


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def test_sharded_layout(folders):
    """model-0000i-of-0000n.safetensors + an index mapping every tensor, no model.safetensors beside them; shards stay
    under the limit unless they hold one larger tensor; the same tensors as the single file."""
    single, sharded = folders["single"], folders["sharded"]
    files = shards(sharded)
    assert len(files) >= 3 and not (sharded / WEIGHTS_FILE).exists() and not (single / INDEX_FILE).exists()
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not list(sharded.glob(".*")) and not list(sharded.glob("*.part"))  # no provisional names left
    index = json.loads((sharded / INDEX_FILE).read_text())
    expected = load_file(single / WEIGHTS_FILE)
    assert index["weight_map"].keys() == expected.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    got = {}
    for f in files:
        part = load_file(f)
        assert all(index["weight_map"][k] == f.name for k in part)
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= SHARD
        got.update(part)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    # The parts of one stacked vLLM parameter (q/k/v or gate/up of a layer, or one linear's qweight/qzeros/scales) sit
    # in different files somewhere, so stacked loading really reads across shards.
    layers = {int(k.split(".")[2]) for k in index["weight_map"] if k.startswith("model.layers.")}
    stacks = [[f"model.layers.{i}.self_attn.{p}.qweight" for p in ("q_proj", "k_proj", "v_proj")] for i in layers]
    stacks += [[f"model.layers.{i}.mlp.{p}.{t}" for p in ("gate_proj", "up_proj") for t in ("qweight", "qzeros", "scales")] for i in layers]
    assert any(len({index["weight_map"][k] for k in stack}) > 1 for stack in stacks)


def test_max_shard_size_option(capsys):
    args = ["--model", "m", "--out", "o"]
    assert parse_args(args).max_shard_bytes == SHARD_BYTES == 5 * 10**9
    assert parse_args([*args, "--max-shard-size", "2GiB"]).max_shard_bytes == 2 * 2**30
    assert parse_args([*args, "--max-shard-size", "500MB"]).max_shard_bytes == 500 * 10**6
    with pytest.raises(SystemExit):
        parse_args([*args, "--max-shard-size", "5 parsecs"])
    assert "is not a size such as 5GB" in capsys.readouterr().err
    with pytest.raises(QuantizationError, match="--max-shard-size must be at least 1 byte"):
        QuantizeConfig("m", "o", max_shard_bytes=0)


def test_single_file_is_what_save_file_writes(folders, tmp_path):
    """Below the limit the writer's file is byte for byte save_file's, as the exporter wrote it before sharding."""
    tensors = load_file(folders["single"] / WEIGHTS_FILE)
    save_file(tensors, tmp_path / "direct.safetensors", metadata={"format": "pt"})
    (tmp_path / "writer").mkdir()
    assert write_tensors(tmp_path / "writer", tensors) == [WEIGHTS_FILE]
    assert (tmp_path / "writer" / WEIGHTS_FILE).read_bytes() == (tmp_path / "direct.safetensors").read_bytes()


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_vllm_loaders_read_our_folders(folders, layout):
    """Config keys, file discovery, every tensor's name, dtype and shape as vLLM's awq / awq_marlin loaders read them,
    at tp 1 and 2 (the tiny models' 6 heads, 2 kv heads, hidden 192, intermediate 320 split evenly at g32)."""
    for tp in (1, 2):
        plan = vllm_plan(folders[layout], tp)
        assert plan.errors == [], (tp, plan.errors)
        # K per rank is 192, 96 or 160, never a multiple of 128: every layer takes awq_marlin's AWQ-kernel fallback.
        assert not any(plan.marlin.values())


def test_vllm_checker_catches_what_vllm_refuses(folders, tmp_path):
    """The checker is not vacuous: each break below is one vLLM's loaders would trip on."""
    assert any("num_attention_heads 6" in e for e in vllm_plan(folders["single"], 4).errors)
    tiny = json.loads((folders["single"] / "config.json").read_text())
    assert any("not divisible by group size 64" in e for e in tp_plan(tiny, 64, 2).errors)
    assert vllm_plan(folders["fake-single"], 1).errors == ["config.json has no quantization_config"]

    def broken(name, edit_config=None, edit_tensors=None, edit_index=None):
        dst = tmp_path / name
        shutil.copytree(folders["sharded"], dst)
        if edit_config:
            cfg = json.loads((dst / "config.json").read_text())
            edit_config(cfg)
            (dst / "config.json").write_text(json.dumps(cfg))
        if edit_tensors:
            f = next(f for f in shards(dst) if any(k.endswith(".scales") for k in load_file(f)))
            t = load_file(f)
            edit_tensors(t)
            save_file(t, f, metadata={"format": "pt"})
        if edit_index:
            index = json.loads((dst / INDEX_FILE).read_text())
            edit_index(index)
            (dst / INDEX_FILE).write_text(json.dumps(index))
        return vllm_plan(dst, 1).errors

    assert any("bits 3" in e for e in broken("bits", lambda c: c["quantization_config"].update(bits=3)))
    assert any("zero_point" in e for e in broken("zp", lambda c: c["quantization_config"].pop("zero_point")))
    stray = broken("extra", edit_tensors=lambda t: t.update(stray=torch.zeros(2)))
    assert any("no such vLLM parameter" in e for e in stray)
    assert any("disagree" in e for e in broken("index", edit_index=lambda i: i["weight_map"].popitem()))
    assert any("vLLM expects" in e for e in broken("dtype", edit_tensors=lambda t: t.update(
        {k: v.float() for k, v in t.items() if k.endswith(".scales")})))


def test_tensor_parallel_conditions_of_the_default_shapes(default_fp16_dir):
    """What the checks above say for real shapes (answers, not goals). SmolLM2-135M (the default model, g32): tp 1
    loads, only down_proj runs Marlin (hidden 576 is not a multiple of 128: the rest falls back to the AWQ kernel);
    tp 2 cannot work at all (9 attention heads, 3 kv heads), tp 3 can. Qwen2.5-Coder-0.5B at g128: tp 1 runs Marlin
    everywhere; tp 2 fails, o_proj's 896 / 2 = 448 inputs per rank are not a multiple of 128
    (AWQLinearMethod.create_weights raises, for awq and awq_marlin alike); at g64 tp 2 loads, o_proj on AWQ's kernel."""
    smol = json.loads((default_fp16_dir / "config.json").read_text())
    p = tp_plan(smol, 32, 1)
    assert p.errors == [] and p.marlin == {"self_attn.qkv_proj": False, "self_attn.o_proj": False,
                                           "mlp.gate_up_proj": False, "mlp.down_proj": True}
    assert any("num_attention_heads 9" in e for e in tp_plan(smol, 32, 2).errors)
    assert tp_plan(smol, 32, 3).errors == []
    p = tp_plan(QWEN25_05B, 128, 1)
    assert p.errors == [] and all(p.marlin.values())
    assert tp_plan(QWEN25_05B, 128, 2).errors == [
        "self_attn.o_proj: input size per rank 448 is not divisible by group size 128"]
    p = tp_plan(QWEN25_05B, 64, 2)
    assert p.errors == [] and [k for k, v in p.marlin.items() if not v] == ["self_attn.o_proj"]


def last_logits(folder: Path) -> torch.Tensor:
    runner = ModelRunner(folder, RunnerConfig(device="cpu", dtype="float32", lm_head="dense", max_seq_len=64))
    slot = runner.alloc_slot()
    return runner.prefill(slot, IDS)


@torch.inference_mode()
def test_sharded_reads_back_through_our_loader(folders):
    """tinyserve.weights reads the index: the sharded folders give exactly the single-file folders' logits."""
    for single, sharded in (("single", "sharded"), ("fake-single", "fake-sharded")):
        torch.testing.assert_close(last_logits(folders[sharded]), last_logits(folders[single]), atol=0, rtol=0)


@torch.inference_mode()
def test_sharded_reads_back_through_transformers(folders):
    """transformers resolves the packed folder's shards from the index, and loads the sharded fake-quant folder (same
    writer, plain fp16) to exactly the single-file folder's logits."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.hub import get_checkpoint_shard_files

    sharded = folders["sharded"]
    paths, meta = get_checkpoint_shard_files(str(sharded), str(sharded / INDEX_FILE))
    assert sorted(Path(p) for p in paths) == shards(sharded)
    assert set(meta["all_checkpoint_keys"]) == load_file(folders["single"] / WEIGHTS_FILE).keys()

    def logits(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(IDS[None]).logits[0, -1]

    assert len(shards(folders["fake-sharded"])) >= 3
    torch.testing.assert_close(logits(folders["fake-sharded"]), logits(folders["fake-single"]), atol=0, rtol=0)
