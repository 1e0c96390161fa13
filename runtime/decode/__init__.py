"""Generation (dynamic or static KV cache, CUDA graphs) and latency profiling of a loaded model."""
