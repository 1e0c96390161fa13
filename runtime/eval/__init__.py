"""Evaluation of a loaded model: perplexity, KL divergence from a base, the base log-prob cache."""
