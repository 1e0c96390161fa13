"""The ``.llmq`` artifact on disk: packed layout, manifest schema, reader, accounting and verify.

The bottom layer: it imports nothing else of llmq but :mod:`llmq.errors`, so the quantizer, the
runtime and the kernels' emulation all share one description of the bytes.
"""
