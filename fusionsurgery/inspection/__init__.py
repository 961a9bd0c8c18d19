"""``inspect``: describe any checkpoint (base, fused or adapter) from its safetensors headers alone.

Nothing here reads tensor data or imports torch.
"""

from .describe import FusionSummary, Inspection, KeyDiff, TensorChange, diff_keys, inspect_checkpoint

__all__ = ["FusionSummary", "Inspection", "KeyDiff", "TensorChange", "diff_keys", "inspect_checkpoint"]
