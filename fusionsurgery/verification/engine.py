"""Which engine runs ``verify``'s forward checks for a decoder, decided before any of them runs.

- ``native``: the types ``fusionsurgery.modules`` implements (llama, mistral, qwen2, qwen3, gemma,
  phi3), dependency-free;
- ``hf``: every other type, through the base's own transformers class with the fusion blocks
  attached (``fusionsurgery.hf``), when transformers is installed;
- ``skip``: no transformers: the checks that need no forward still run, the forward ones are
  reported skipped with the one-line hint to install the ``[hf]`` extra.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from .._requirements import type_floor_problem
from ..arch.config import ModelConfig
from ..arch.quantization import missing_library, read_quantization
from ..errors import UsageError

#: The one-line hint shown when the forward of a non-native type needs transformers.
HF_HINT = 'pip install "fusionsurgery[hf]"'


@dataclass(frozen=True)
class Engine:
    """The decision: ``kind`` is "native", "hf" or "skip"; ``reason`` says why for "skip"."""

    kind: str
    reason: str = ""


def forward_engine(cfg: ModelConfig, doc: dict[str, Any] | None = None) -> Engine:
    """The engine for ``cfg``'s forward checks (see the module docstring); ``doc`` is the checkpoint's
    config.json, whose ``quantization_config`` may need a library beyond transformers.

    Raises:
        UsageError: the type runs through transformers and the installed release is older than the one
            it needs (``fusionsurgery._requirements.TRANSFORMERS_FOR_TYPE``), or the quantization format needs a
            library that is not installed (one line naming it), before any check runs.
    """
    if cfg.native:
        return Engine("native")
    quant = read_quantization(doc)
    problem = missing_library(quant) if quant is not None else None
    if problem is not None:
        raise UsageError(problem)
    if importlib.util.find_spec("transformers") is None:
        return Engine("skip", f"model type {cfg.model_type!r} has no native modules and its forward checks run "
                              f"through transformers: {HF_HINT}")
    problem = type_floor_problem(cfg.model_type)
    if problem is not None:
        raise UsageError(problem)
    return Engine("hf")
