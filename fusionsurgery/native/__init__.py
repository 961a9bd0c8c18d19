"""The torch-side API on the project's own modules: build, load and decode a fused decoder.

- ``builders``: decoders and fusion layers from a ``ModelConfig`` / ``FusionConfig``;
- ``loading``: ``load_fused`` / ``open_model`` (a checkpoint directory into a ``TransformerDecoder``);
- ``generation``: ``generate`` (greedy, top-k, top-p) through the KV caches.

The transformers-side twin of this package is ``fusionsurgery.hf``.
"""
