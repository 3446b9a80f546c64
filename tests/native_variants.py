"""Which builds of our CPU kernels (tinyserve_kernels/cpu_native.py, VARIANTS) the tests can run here, shared by the kernel
tests and the cpu-native backend's tests: native (the best engine of this CPU) and each engine below it."""

import platform
from functools import cache

import pytest

from tinyserve_kernels import cpu_native

ENGINE_RANK = {e: i for i, e in enumerate(cpu_native.ENGINES)}  # portable < avx512f < avx512bf16 < amx
VARIANT_ENGINE = {"avx512bf16": "avx512bf16", "avx512f": "avx512f", "portable": "portable"}
VARIANT_NEEDS = {"avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}, "avx512f": {"avx512f", "avx512bw", "avx512vl"}, "portable": set()}


@cache
def build_error(variant: str) -> str | None:
    """None when the variant builds and loads here, else why not (the reason a test skips with)."""
    if variant != "native" and platform.machine() not in ("x86_64", "AMD64"):
        return f"the {variant} build is x86-64 only"
    try:
        cpu_native.load(variant)
    except Exception as e:  # no compiler, no ninja, a failed compile: the runtime falls back, the tests skip
        return f"the {variant} build failed: {type(e).__name__}: {str(e).strip()[-300:]}"
    return None


@cache
def variants() -> list[str]:
    """native plus each lower engine this CPU can run (a variant whose engine is native's own adds nothing)."""
    if build_error("native"):
        return []
    top = ENGINE_RANK[cpu_native.engine("native")]
    flags = set(cpu_native._cpu_flags().split())
    return ["native"] + [v for v, e in VARIANT_ENGINE.items() if ENGINE_RANK[e] < top and VARIANT_NEEDS[v] <= flags]


def need(variant: str) -> None:
    err = build_error(variant)
    if err:
        pytest.skip(err)
    if variant not in variants():
        pytest.skip(f"{variant}: this CPU cannot run it, or it is the native build's own engine")


ALL_VARIANTS = ["native", "avx512bf16", "avx512f", "portable"]
