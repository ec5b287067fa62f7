"""The compressed KV data type (packed per head, lengths, positions) and its quantization; no kernels."""
