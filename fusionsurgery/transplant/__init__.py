"""Moving trained fusion parts between models: ``import`` a Hugging Face Mllama checkpoint into the
fused layout, and ``graft`` an adapter onto another base of the same dimensions."""

from .graft import GraftResult, graft
from .mllama_import import ImportResult, import_mllama

__all__ = ["GraftResult", "ImportResult", "graft", "import_mllama"]
