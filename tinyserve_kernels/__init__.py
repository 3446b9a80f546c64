"""INT4 kernels and the packed weight layout (layout.py). Imports neither tinyserve_quantize nor tinyserve.

Importing this package loads nothing: import the module you need (layout, dispatch, cpu, cpu_native, gemm, gemv).
"""
