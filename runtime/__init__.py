"""Load and run models: model resolution, text sources, perplexity and generation.

The runtime never imports the quantizer. Import the submodules you need; this package
imports nothing heavy on its own.
"""
