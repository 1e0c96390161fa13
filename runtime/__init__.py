"""Load and run models, in layers that import only downward:

``format``   the artifact on disk: packed layout, manifest schema, reader, accounting, verify
``sources``  what a run is given: model folders and hub ids, the demo model, texts, tokenization,
             the device and dtype asked for
(here)       execution: the loader, ``QuantLinear`` and its backends, multi-device placement
``decode``   generation and latency profiling
``eval``     perplexity, KL divergence and the base log-prob cache
``api``      the public Python API (``llmq.load``, ``llmq.perplexity``, ...), which the CLI wires

``tests/test_layers.py`` enforces the direction. The runtime never imports the quantizer; the
quantizer imports only ``format`` and ``sources``. Importing a package here does no work.
"""
