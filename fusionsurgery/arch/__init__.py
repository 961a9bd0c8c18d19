"""Architectures as data: naming families (key templates) and the model config."""
