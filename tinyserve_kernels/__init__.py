"""INT4 kernels, the packed weight layout (layout.py) and the safetensors checkpoint reader (checkpoint.py).
Imports neither tinyserve_quantize nor tinyserve.

Importing this package loads nothing: import the module you need (layout, checkpoint, dispatch, cpu, cpu_native, gemm, gemv).
"""
