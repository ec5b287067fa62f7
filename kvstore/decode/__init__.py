"""Answering from a compressed prefix: the transformers Cache over it, decode kernels, generation."""
