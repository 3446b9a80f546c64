"""INT4 kernels and the packed weight layout. Imports neither `quantize` nor `tinyserve`."""

from tinyserve_kernels.dispatch import Int4Weights, int4_linear, prepare

__all__ = ["Int4Weights", "int4_linear", "prepare"]
