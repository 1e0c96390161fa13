"""CUDA kernels loaded through CuPy. Not yet built; the torch reference path is used everywhere."""
