"""The hand-written CUDA kernels (``*.cu``, ``*.cuh``), their loader and their numpy emulation.

Nothing here compiles or imports CuPy at import time: :mod:`llmq.cuda.loader` compiles a
kernel file on first use per device.
"""
