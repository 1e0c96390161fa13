"""Quantization (offline): calibration, stripe selection, GPTQ and packing. Not yet built."""
