"""Quantized bases: which method a checkpoint uses, which tensors hold its quantization, and the skip lists
that keep the fusion blocks out of it (DESIGN.md section 6). Header-level only: never imports torch.

A quantized release records its method in config.json's ``quantization_config`` and keeps tensors beside
each quantized weight (scales, zero points, packed values). Those tensors are the base's own: fusion copies
their bytes like any other and they belong to the layer whose module they sit under. The fusion blocks are
new float modules, so the fused config.json must name them in the list the method's loader reads, with the
rule that loader matches by (:func:`skip_fusion_modules`); :func:`unskipped_fusion_modules` checks it.

Parameters are counted as the model has them: a packed tensor holds several values per element (a GPTQ
``qweight`` ``[in/8, out]`` I32 holds ``in * out`` 4-bit weights), and scales, zero points, group indices and
quantization states are not parameters (:func:`param_count`).
"""

from __future__ import annotations

import copy
import importlib.util
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError

#: Each method's tensors that hold quantization data beside (or instead of) a module's ``weight``: the last
#: part(s) of the key after the module's name. ``weight`` itself, where it stays, is the quantized values.
SIDE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "fp8": ("weight_scale_inv", "weight_scale", "activation_scale", "input_scale"),
    "compressed-tensors": ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale",
                           "weight_shape", "input_scale", "input_zero_point", "input_global_scale", "output_scale",
                           "output_zero_point", "k_scale", "v_scale"),
    "gptq": ("qzeros", "scales", "g_idx"),
    "awq": ("qzeros", "scales"),
    "mxfp4": ("_scales",),  # gate_up_proj_scales, down_proj_scales
    "bitsandbytes": ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                     "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4", "SCB",
                     "weight_format"),
}
#: Each method's tensors that pack several quantized values into one stored element.
PACKED_SUFFIXES: dict[str, tuple[str, ...]] = {
    "gptq": ("qweight",), "awq": ("qweight",), "compressed-tensors": ("weight_packed",), "mxfp4": ("_blocks",),
    "bitsandbytes": ("weight",),
}
#: Bits of each stored dtype (for how many values a packed element holds).
_STORAGE_BITS = {"I32": 32, "U32": 32, "I64": 64, "I16": 16, "U16": 16, "U8": 8, "I8": 8}
#: The config list each method's loader reads for modules left in float (transformers' configs).
SKIP_FIELDS: dict[str, tuple[str, ...]] = {
    "fp8": ("modules_to_not_convert",),
    "mxfp4": ("modules_to_not_convert",),
    "awq": ("modules_to_not_convert",),
    "gptq": ("modules_to_not_convert",),
    "bitsandbytes": ("llm_int8_skip_modules", "modules_to_not_convert"),
    "compressed-tensors": ("ignore",),
}
#: What a CPU forward of each method needs beyond transformers: (import name, pip requirement).
LIBRARIES: dict[str, tuple[tuple[str, str], ...]] = {
    "compressed-tensors": (("compressed_tensors", "compressed-tensors"),),
    "bitsandbytes": (("bitsandbytes", "bitsandbytes"),),
    "gptq": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")),
    "awq": (("gptqmodel", "gptqmodel"),),
}
#: Methods read here, as config.json's ``quant_method`` names them.
METHODS = tuple(SIDE_SUFFIXES)


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's quantization, as its config.json and tensors state it.

    Attributes:
        method: ``quantization_config.quant_method`` (``fp8``, ``compressed-tensors``, ``gptq``, ``awq``,
            ``mxfp4``, ``bitsandbytes``).
        bits: bits per quantized weight (8 for FP8; 4 for MXFP4, NF4, most GPTQ/AWQ), None when unstated.
        detail: one phrase on the format (``F8_E4M3 weights, weight_scale_inv per 128x128 block``).
        config: the ``quantization_config`` itself.
    """

    method: str
    bits: int | None
    detail: str
    config: dict[str, Any]

    @property
    def skip_fields(self) -> tuple[str, ...]:
        return SKIP_FIELDS[self.method]

    def is_side(self, key: str) -> bool:
        """Whether ``key`` holds quantization data (a scale, zero point, group index, quantization state)."""
        return any(key.endswith(("." if not s.startswith("_") else "") + s) for s in SIDE_SUFFIXES[self.method])

    def is_packed(self, key: str, dtype: str) -> bool:
        """Whether ``key`` packs several quantized values per stored element (integer storage)."""
        if dtype not in _STORAGE_BITS or self.bits is None or self.bits >= _STORAGE_BITS[dtype]:
            return False
        return any(key.endswith(("." if not s.startswith("_") else "") + s) for s in PACKED_SUFFIXES.get(self.method, ()))

    def param_count(self, key: str, dtype: str, numel: int) -> int:
        """Parameters of the model in tensor ``key``: its values unpacked; 0 for quantization data."""
        if self.is_side(key):
            return 0
        if self.is_packed(key, dtype):
            assert self.bits is not None
            return numel * (_STORAGE_BITS[dtype] // self.bits)
        return numel

    def module_of(self, key: str) -> str:
        """The module a tensor belongs to (``model.layers.0.mlp.down_proj`` for its ``weight_scale_inv``)."""
        for suffix in sorted(SIDE_SUFFIXES[self.method] + PACKED_SUFFIXES.get(self.method, ()) + ("weight", "bias"),
                             key=len, reverse=True):
            if suffix.startswith("_") and key.endswith(suffix):  # gate_up_proj_blocks: the experts module
                return key.rsplit(".", 1)[0]
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1]
        return key.rsplit(".", 1)[0]

    def to_dict(self, keys: Iterable[str] = (), dtypes: Mapping[str, str] | None = None) -> dict[str, Any]:
        """What ``inspect`` shows: method, bits, format and which tensors hold quantization data."""
        side = sorted({_suffix_of(k, SIDE_SUFFIXES[self.method]) for k in keys if self.is_side(k)})
        dtypes = dtypes or {}
        packed = sorted({_suffix_of(k, PACKED_SUFFIXES.get(self.method, ())) for k in keys
                         if self.is_packed(k, dtypes.get(k, ""))})
        quantized_dtypes = sorted({d for k, d in dtypes.items() if d.startswith("F8_") and not self.is_side(k)})
        return {"method": self.method, "bits": self.bits, "format": self.detail,
                "skip_lists": list(self.skip_fields), "side_tensors": side, "packed_tensors": packed,
                "quantized_dtypes": quantized_dtypes}


def _suffix_of(key: str, suffixes: Iterable[str]) -> str:
    for s in sorted(suffixes, key=len, reverse=True):
        if key.endswith(("." if not s.startswith("_") else "") + s):
            return s if not s.startswith("_") else "*" + s
    return key.rsplit(".", 1)[-1]


def read_quantization(doc: Mapping[str, Any] | None, where: str = "config.json") -> Quantization | None:
    """The quantization config.json states, or None for a float checkpoint.

    Args:
        doc: the config.json (``quantization_config`` at the top, or under ``text_config``).
        where: named in errors.

    Returns:
        Quantization | None.

    Raises:
        CheckpointError: a ``quantization_config`` that is not an object, or a method this tool does not
            know how to keep the fusion blocks out of (fusing it would leave them to the loader's mercy).
    """
    if not isinstance(doc, Mapping):
        return None
    qc = doc.get("quantization_config")
    if qc is None and isinstance(doc.get("text_config"), Mapping):
        qc = doc["text_config"].get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is {type(qc).__name__}, expected an object")
    method = qc.get("quant_method")
    if method == "bitsandbytes" or (method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit"))):
        method = "bitsandbytes"
    if method not in METHODS:
        raise CheckpointError(f"{where}: quantization method {method!r} is not one fusionsurgery keeps fusion blocks "
                              f"out of (known: {', '.join(METHODS)})")
    return Quantization(method, _bits(method, qc), _detail(method, qc), qc)


def _bits(method: str, qc: dict[str, Any]) -> int | None:
    if method == "fp8":
        return 8
    if method == "mxfp4":
        return 4
    if method == "bitsandbytes":
        return 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None
    if method == "compressed-tensors":
        bits = {g.get("weights", {}).get("num_bits") for g in (qc.get("config_groups") or {}).values()
                if isinstance(g, dict) and isinstance(g.get("weights"), dict)}
        return bits.pop() if len(bits) == 1 and isinstance(next(iter(bits)), int) else None
    value = qc.get("bits", qc.get("w_bit"))
    return value if isinstance(value, int) else None


def _detail(method: str, qc: dict[str, Any]) -> str:
    if method == "fp8":
        block = qc.get("weight_block_size")
        scale = f"weight_scale_inv per {'x'.join(map(str, block))} block" if block else "weight_scale per tensor"
        return f"F8_E4M3 weights, {scale}, {qc.get('activation_scheme', 'dynamic')} activations"
    if method == "compressed-tensors":
        return f"compressed-tensors {qc.get('format', '?')}"
    if method == "mxfp4":
        return "MXFP4 experts (*_blocks: 4-bit values, *_scales: E8M0 per 32)"
    if method == "bitsandbytes":
        kind = qc.get("bnb_4bit_quant_type", "nf4") if qc.get("load_in_4bit") else "int8"
        return f"bitsandbytes {kind}"
    return f"{method} {qc.get('bits', '?')}-bit, group size {qc.get('group_size', qc.get('q_group_size', '?'))}"


def checkpoint_quantization(doc: Mapping[str, Any] | None, keys: Iterable[str], dtypes: Mapping[str, str],
                            where: str = "config.json") -> Quantization | None:
    """:func:`read_quantization`, refusing tensors that are quantized without a config saying how.

    Raises:
        CheckpointError: see :func:`read_quantization`; FP8 weights or quantization tensors with no
            ``quantization_config`` (how they are read, and what a loader skips, would be unknown).
    """
    quant = read_quantization(doc, where)
    if quant is not None:
        return quant
    marks = [k for k in keys if k.endswith((".weight_scale_inv", ".qweight", ".weight.absmax", "_blocks"))
             or (dtypes.get(k, "").startswith("F8_") and k.endswith(".weight"))]
    if marks:
        raise CheckpointError(f"{where}: no quantization_config, but the tensors are quantized ({marks[0]} ...); "
                              "give the config.json the release came with")
    return None


def missing_library(quant: Quantization) -> str | None:
    """One line naming what a forward of ``quant``'s format through transformers needs and is not installed
    (compressed-tensors, bitsandbytes, optimum + gptqmodel); None when nothing is missing (block FP8 and MXFP4
    need nothing beyond transformers, which dequantizes them where no GPU runs them)."""
    missing = [pip for module, pip in LIBRARIES.get(quant.method, ()) if importlib.util.find_spec(module) is None]
    if not missing:
        return _fp8_without_triton() if quant.method == "fp8" else None
    names = " and ".join(missing)
    return (f"this {quant.method} checkpoint runs through transformers with {names}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install \"fusionsurgery[quant]\" "
            f"(or pip install {' '.join(missing)})")


def _fp8_without_triton() -> str | None:
    """One line when the installed transformers reads block FP8 only with triton (a GPU package): its FP8
    integration imported triton at once in the early 5.x releases (5.0 measured), where later ones dequantize
    on a CPU without it (5.25 measured). Called on the forward path only, where transformers is needed anyway."""
    if importlib.util.find_spec("triton") is not None:
        return None
    try:
        importlib.import_module("transformers.integrations.finegrained_fp8")
    except ImportError as exc:
        import transformers

        return (f"this fp8 checkpoint runs through transformers, and transformers {transformers.__version__} reads "
                f"FP8 only with triton ({exc}): a newer transformers dequantizes it without (5.25 tested): "
                "pip install -U transformers")
    return None


def is_quantized(doc: Mapping[str, Any] | None) -> bool:
    """Whether config ``doc`` states a quantization (without judging it)."""
    if not isinstance(doc, Mapping):
        return False
    text = doc.get("text_config")
    return doc.get("quantization_config") is not None or (
        isinstance(text, Mapping) and text.get("quantization_config") is not None)


# -- skip lists ---------------------------------------------------------------------------------------------------

def transformers_skips(module: str, patterns: Iterable[str]) -> bool:
    """Whether transformers leaves ``module`` unconverted for skip list ``patterns``: a pattern matches from the
    start of the name to a ``.`` boundary (also as a regex), or as a suffix (``quantizers_utils``' rule in
    transformers 5; the project's tests check this against transformers' own function)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for pattern in patterns:
        try:
            if re.match(rf"(?:{pattern}){boundary}", module) or module.endswith(pattern):
                return True
        except re.error:
            if module.endswith(pattern):
                return True
    return False


def compressed_tensors_skips(module: str, patterns: Iterable[str]) -> bool:
    """Whether compressed-tensors ignores ``module``: an exact name, or a ``re:`` regex matched at its start."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                if re.match(pattern[3:], module):
                    return True
            except re.error:
                continue
        elif pattern == module:
            return True
    return False


def _skipped(quant: Quantization, module: str) -> bool:
    if quant.method == "compressed-tensors":
        return compressed_tensors_skips(module, quant.config.get("ignore") or [])
    return all(transformers_skips(module, quant.config.get(f) or []) for f in quant.skip_fields
               if f in quant.config or f == quant.skip_fields[0])


def fusion_modules(layer_prefix: str, layers: Iterable[int], embedding_key: str | None = None) -> list[str]:
    """The module names of the fusion blocks: ``{layer_prefix}.{i}.fusion_layer`` per fused layer, and the fusion
    embedding (``model.embed_tokens.fusion_embedding``) when ``embedding_key`` is given."""
    names = [f"{layer_prefix}.{i}.fusion_layer" for i in layers]
    if embedding_key:
        names.append(f"{embedding_key.removesuffix('.weight')}.fusion_embedding")
    return names


def unskipped_fusion_modules(quant: Quantization, modules: Iterable[str]) -> list[str]:
    """The fusion modules (or their linears: ``modules`` may name either) the config's skip list lets the
    loader quantize; empty when every one is kept float."""
    return [m for m in modules if not _skipped(quant, m) and not _skipped(quant, m + ".cross_attn.q_proj")]


def skip_fusion_modules(quant: Quantization, modules: list[str], float_linears: Iterable[str] = (),
                        quantized_in_block: Iterable[str] = ()) -> dict[str, Any]:
    """The ``quantization_config`` for the fused checkpoint: the base's, with the fusion ``modules`` added to the
    list its loader reads, by the rule it matches by.

    Args:
        quant: the base's quantization.
        modules: the fusion modules (:func:`fusion_modules`).
        float_linears: the base's own modules left unquantized outside the layers (``lm_head``): transformers
            adds these itself only while the list is unset, so they join a list this sets.
        quantized_in_block: GPTQ: the quantized module names inside one decoder layer (``self_attn.q_proj`` ...),
            for ``modules_in_block_to_quantize`` when the base leaves it unset (optimum then quantizes every
            linear of the block, the fusion layer's included).

    Returns:
        dict: a new config (the base's is not changed). Transformers' lists get each fusion module's name (a
        pattern that matches it to a ``.`` boundary, and that older releases' substring rule matches too);
        compressed-tensors' ``ignore`` gets one ``re:`` regex anchored at the names' start.
    """
    qc = copy.deepcopy(quant.config)
    if quant.method == "compressed-tensors":
        layers = [m for m in modules if m.endswith(".fusion_layer")]
        if layers:
            prefix = layers[0].rsplit(".", 2)[0]
            indices = "|".join(m.rsplit(".", 2)[1] for m in layers)
            qc["ignore"] = list(qc.get("ignore") or []) + [f"re:^{re.escape(prefix)}\\.(?:{indices})\\.fusion_layer\\."]
        qc["ignore"] = list(qc.get("ignore") or []) + [m for m in modules if not m.endswith(".fusion_layer")]
        return qc
    for field in quant.skip_fields:
        if field != quant.skip_fields[0] and field not in qc:
            continue
        current = qc.get(field)
        base = list(current) if current else list(float_linears)
        qc[field] = base + [m for m in modules if m not in base]
    if quant.method == "gptq" and not qc.get("modules_in_block_to_quantize") and quantized_in_block:
        qc["modules_in_block_to_quantize"] = [sorted(set(quantized_in_block))]
    return qc
