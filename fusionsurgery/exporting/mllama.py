"""``--to mllama``: a fused checkpoint as transformers' ``MllamaForCausalLM`` (Llama 3.2 Vision's text model).

Mllama keeps cross-attention as decoder layers of their own, numbered among the self-attention
layers, so each fusion layer becomes the layer just before the one it wraps (or just after it, for
``--fusion-after``). Its per-layer names are the HF fusion names already (DESIGN.md section 3), so
the layers are renumbered, not rewritten. Mllama's ``embed_tokens`` has ``vocab_size + 8`` rows: the
fusion vocabulary is folded in (padded with zero rows or trimmed to 8, and said so), and ``lm_head``
keeps ``vocab_size`` rows (written out for a tied base). A torchtune-named source has its q/k rows
permuted back to Hugging Face's RoPE layout. Everything else keeps its bytes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..arch.families import FAMILIES, FUSION_SEGMENT
from ..arch.model_types import MODEL_TYPES
from ..arch.quantization import Quantization, read_quantization, skip_fusion_modules
from ..arch.rope_config import read_rope
from ..surgery.quantized import base_config_of, quantization_of
from ..errors import UsageError, listed
from ..io.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from ..io.identity import public_config
from ..io.atomic import AtomicDirectory
from .common import (EXPORT_MANIFEST_NAME, ExportResult, Source, copy_sidecars, export_manifest, listed_files,
                     tensor_entries, write_json, write_source_tensors)
from ..arch.mllama_layouts import VISION_DIR, origin_config, origin_pad, read_origin
from ..arch.rope_layout import describe, head_permutation, rotates
from .tensors import OutTensor, Part, Progress, index_doc, same

#: Rows Mllama's ``embed_tokens`` has beyond ``vocab_size``.
MLLAMA_EXTRA_TOKENS = 8
HF = FAMILIES["hf"]


#: Quantization methods whose Mllama export keeps its cross-attention layers float by the config's list (GPTQ
#: and AWQ name modules relative to a block, which Mllama's cross-attention layers would match too).
MLLAMA_QUANTIZATION = ("fp8", "compressed-tensors", "bitsandbytes")


def as_llama(src: Source) -> Source:
    """A quantized Llama (read as its layers wrapped as they are) described as the Llama its config.json states,
    in transformers' names: RoPE settings from the config (the tensors are scaled or packed, so only the
    config tells); ``src`` itself otherwise.

    Raises:
        UsageError: a quantized base of another type, or a method whose skip list cannot name Mllama's
            cross-attention layers alone (``MLLAMA_QUANTIZATION``).
    """
    quant = quantization_of(src.ckpt)
    if quant is None or src.cfg.native:
        return src
    doc = src.ckpt.config or {}
    if src.cfg.model_type != "llama" or doc.get("attention_bias") or doc.get("mlp_bias"):
        raise UsageError(f"`to` mllama needs a Llama-shaped base (Mllama's text model is Llama's); this quantized "
                         f"one is {src.cfg.model_type}" + (" with biases" if src.cfg.model_type == "llama" else ""))
    if quant.method not in MLLAMA_QUANTIZATION:
        raise UsageError(f"`to` mllama of a {quant.method} checkpoint: its loader names quantized modules relative to "
                         "a decoder layer, which would quantize Mllama's cross-attention layers too; "
                         f"supported: {', '.join(MLLAMA_QUANTIZATION)}")
    if src.cfg.family_obj.layer_prefix != HF.layer_prefix or src.cfg.family_obj.marker != HF.marker:
        raise UsageError("`to` mllama of a quantized Llama needs transformers' names (model.layers.N.)")
    theta, scaling = read_rope(doc, MODEL_TYPES["llama"].default_theta)
    cfg = dataclasses.replace(src.cfg, family=HF.name, layer_prefix="", embedding_key="", rope_theta=theta,
                              rope_scaling=scaling)
    return dataclasses.replace(src, cfg=cfg)


def check_supported(src: Source) -> None:
    """Mllama's text model is the Llama recipe exactly: refuse what it cannot express, saying why."""
    cfg, fusion = src.cfg, src.fusion
    if fusion is None or not fusion.layers:
        raise UsageError(f"{src.path} is not a fused checkpoint (no fusion layers): Mllama needs cross-attention "
                         "layers; run `fusionsurgery fuse` first")
    if fusion.encoder_dim and fusion.encoder_dim != cfg.dim:
        raise UsageError(
            f"this checkpoint was fused with `encoder_dim` {fusion.encoder_dim}, but Mllama's cross-attention reads "
            f"states as wide as the decoder ({cfg.dim}); fuse again without `encoder_dim` (project the encoder "
            f"states to {cfg.dim} first) to export to Mllama"
        )
    if not cfg.native and quantization_of(src.ckpt) is None:
        raise UsageError(
            f"`to` mllama needs a Llama-shaped base (Mllama's text model is Llama's); this one is "
            f"{cfg.model_type}, whose decoder layers Mllama cannot express")
    problems = []
    if cfg.attn_bias:
        problems.append("q/k/v biases")
    if cfg.qk_norm:
        problems.append("self-attention q/k norms")
    mt = cfg.model_type_obj if cfg.model_type in MODEL_TYPES else MODEL_TYPES["llama"]
    if mt.fused_qkv or mt.fused_gate_up:  # the checkpoint fuses them too, except in torchtune's names
        # a Phi-3 stays a Phi-3 when torchtune's names split its projections: --to mllama is for Llama bases
        problems.append("fused qkv / gate_up projections" if cfg.fused_qkv or cfg.fused_gate_up else
                        "Phi-3's layers (fused qkv / gate_up in its own layout, split only in torchtune's names)")
    if cfg.norm_offset or cfg.norm_fp32_scale:
        problems.append("1 + w RMSNorms")
    if cfg.embed_scale is not None:
        problems.append("scaled embeddings")
    if cfg.activation != "silu":
        problems.append(f"the {cfg.activation} activation")
    if cfg.head_dim * cfg.num_heads != cfg.dim:
        problems.append(f"head_dim {cfg.head_dim} with {cfg.num_heads} heads on width {cfg.dim}")
    if cfg.sliding_window is not None:
        problems.append(f"a sliding attention window ({cfg.sliding_window})")
    if problems:
        raise UsageError(
            f"Mllama's text model is a plain Llama decoder; this {cfg.model_type} checkpoint has "
            f"{', '.join(problems)}, which it cannot express"
        )
    if cfg.rope_theta is None:
        raise UsageError(
            "RoPE theta and scaling are unknown (no config.json), and Mllama's defaults differ from most bases: "
            "pass `config` PATH with the base's config, or `rope_defaults` llama3 for torchtune's Llama 3 settings"
        )


def layer_order(num_layers: int, fused: list[int], fusion_first: bool) -> list[tuple[str, int]]:
    """The Mllama stack in execution order: ("self", i) for original layer i, ("cross", i) for its fusion layer."""
    chosen = set(fused)
    order: list[tuple[str, int]] = []
    for i in range(num_layers):
        if i in chosen and fusion_first:
            order.append(("cross", i))
        order.append(("self", i))
        if i in chosen and not fusion_first:
            order.append(("cross", i))
    return order


def plan_mllama(src: Source) -> tuple[list[OutTensor], list[dict[str, Any]], list[str]]:
    """(tensors, layer map, notes) of the Mllama export."""
    cfg, fusion, ckpt = src.cfg, src.fusion, src.ckpt
    assert fusion is not None
    family = cfg.family_obj
    key = family.to_family
    perm = head_permutation(cfg.head_dim, cfg.rope_layout, "half")
    moved = perm != tuple(range(cfg.head_dim))
    notes: list[str] = []
    out: list[OutTensor] = []

    # embeddings: vocab rows, then the fusion vocabulary folded in, padded or trimmed to 8 rows
    embed = key("tok_embeddings.weight")
    einfo = ckpt.info(embed)
    parts = [Part(embed)]
    sources = [embed]
    kept = 0
    if fusion.fusion_vocab:
        extra = key("tok_embeddings.fusion_embedding.weight")
        kept = min(fusion.fusion_vocab, MLLAMA_EXTRA_TOKENS)
        parts.append(Part(extra, 0, kept))
        sources.append(extra)
        if fusion.fusion_vocab > MLLAMA_EXTRA_TOKENS:
            notes.append(f"fusion vocabulary trimmed from {fusion.fusion_vocab} to Mllama's {MLLAMA_EXTRA_TOKENS} "
                         f"extra rows: ids {cfg.vocab_size + MLLAMA_EXTRA_TOKENS} and up are dropped")
        if ckpt.info(extra).dtype != einfo.dtype:
            notes.append(f"fusion embedding rows cast from {ckpt.info(extra).dtype} to {einfo.dtype} "
                         "(embed_tokens is one tensor)")
    if kept < MLLAMA_EXTRA_TOKENS:
        parts.append(Part(None, rows=MLLAMA_EXTRA_TOKENS - kept))
        notes.append(f"embed_tokens padded with {MLLAMA_EXTRA_TOKENS - kept} zero row(s) "
                     f"(ids {cfg.vocab_size + kept}..{cfg.vocab_size + MLLAMA_EXTRA_TOKENS - 1}): Mllama has "
                     f"vocab_size + {MLLAMA_EXTRA_TOKENS} embedding rows"
                     + (f", the fusion vocabulary {fusion.fusion_vocab}" if fusion.fusion_vocab else ""))
    fold = f"vocab rows of {embed}" + (f", then rows 0:{kept} of {sources[1]}" if kept else "") + (
        f", then {MLLAMA_EXTRA_TOKENS - kept} zero rows" if kept < MLLAMA_EXTRA_TOKENS else "")
    out.append(OutTensor("model.embed_tokens.weight", einfo.dtype,
                         (cfg.vocab_size + MLLAMA_EXTRA_TOKENS, cfg.dim), parts, f"concatenated: {fold}", sources))

    # decoder layers, renumbered
    layer_map: list[dict[str, Any]] = []
    modules: dict[str, str] = {}  # source module -> Mllama module, for the quantization tensors beside a weight
    cross_keys = {c.split(f"{FUSION_SEGMENT}.", 1)[1] for c in HF.table if f".{FUSION_SEGMENT}." in c}
    for j, (kind, i) in enumerate(layer_order(cfg.num_layers, fusion.layers, fusion.fusion_first)):
        layer_map.append({"mllama_layer": j, "kind": kind, "source_layer": i})
        prefix = f"layers.{i}.{FUSION_SEGMENT}." if kind == "cross" else f"layers.{i}."
        suffixes = sorted(cross_keys) if kind == "cross" else sorted(
            c[len("layers.{i}."):] for c in HF.table
            if c.startswith("layers.{i}.") and f".{FUSION_SEGMENT}." not in c)
        for suffix in suffixes:
            canonical = prefix + suffix
            source = key(canonical)
            target = HF.to_family(canonical).replace(f"model.layers.{i}.", f"model.layers.{j}.", 1)
            if kind == "cross":
                target = target.replace(f"model.layers.{j}.{FUSION_SEGMENT}.", f"model.layers.{j}.", 1)
            modules[source.rsplit(".", 1)[0]] = target.rsplit(".", 1)[0]
            if source not in ckpt.key_to_file:
                continue  # optional tensors this architecture does not have
            if moved and kind == "self" and rotates(canonical):
                heads = ckpt.info(source).shape[0] // cfg.head_dim
                out.append(same(ckpt, source, target, head_perm=perm,
                                transform=describe(cfg.rope_layout, "half", heads, cfg.head_dim)))
            else:
                out.append(same(ckpt, source, target))

    out.append(same(ckpt, key("norm.scale"), "model.norm.weight"))
    if cfg.tie_embeddings:
        out.append(OutTensor("lm_head.weight", einfo.dtype, (cfg.vocab_size, cfg.dim), [Part(embed)],
                             f"copy of the tied {embed} (Mllama's lm_head is its own tensor)", [embed]))
        notes.append("the base ties its output to the embeddings: exported untied, with lm_head.weight written out")
    else:
        out.append(same(ckpt, key("output.weight"), "lm_head.weight"))
    modules[key("output.weight").rsplit(".", 1)[0]] = "lm_head"
    used = {s for t in out for s in t.sources}
    quant = quantization_of(ckpt)
    for name in sorted(set(ckpt.keys()) - used) if quant is not None else []:
        module = quant.module_of(name)  # a scale, zero point or quantization state goes with its weight
        if module in modules:
            out.append(same(ckpt, name, modules[module] + name[len(module):]))
            used.add(name)
    left = sorted(set(ckpt.keys()) - used)
    if left:
        raise UsageError(f"tensor(s) with no place in Mllama's layout: {listed(left, 3)}")
    if moved:
        notes.append("self-attention q/k rows permuted per head from torchtune's interleaved RoPE layout to "
                     "Hugging Face's half layout")
    if abs(fusion.qk_norm_eps - cfg.norm_eps) > 0 or abs(fusion.norm_eps - cfg.norm_eps) > 0:
        notes.append(f"Mllama uses one eps (rms_norm_eps {cfg.norm_eps:g}) for every norm; the fusion layers were "
                     f"built with q/k norm eps {fusion.qk_norm_eps:g} and norm eps {fusion.norm_eps:g}: outputs "
                     "differ slightly")
    return out, layer_map, notes


_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def mllama_config(src: Source, num_layers: int, cross_layers: list[int], notes: list[str],
                  fallback_pad: int | None = None) -> dict[str, Any]:
    """An ``MllamaTextConfig`` document carrying the base's RoPE, norms eps and token ids
    (``fallback_pad``: the pad token to use when the base names none inside the table)."""
    cfg = src.cfg
    base = src.ckpt.config or {}
    rope: dict[str, Any] = {"rope_type": "default"}
    rope.update(cfg.rope_scaling or {})
    rope["rope_theta"] = cfg.rope_theta
    table_rows = cfg.vocab_size + MLLAMA_EXTRA_TOKENS
    pad = base.get("pad_token_id")
    if not (isinstance(pad, int) and 0 <= pad < table_rows) and fallback_pad is not None \
            and 0 <= fallback_pad < table_rows:
        pad = fallback_pad
    if not (isinstance(pad, int) and 0 <= pad < table_rows):
        kept = min(src.fusion.fusion_vocab, MLLAMA_EXTRA_TOKENS) if src.fusion else 0
        eos = base.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if kept < MLLAMA_EXTRA_TOKENS:
            chosen, why = table_rows - 1, "the last padding row of embed_tokens"
        elif isinstance(eos, int) and 0 <= eos < cfg.vocab_size:
            chosen, why = eos, "the eos token"
        else:
            chosen, why = 0, "token 0"
        notes.append(f"pad_token_id set to {chosen} ({why}): "
                     + ("the base's is outside the table" if pad is not None else "the base names none")
                     + " and Mllama's default (128004) must index embed_tokens")
        pad = chosen
    dtype = src.ckpt.info(cfg.family_obj.global_key("tok_embeddings.weight")).dtype
    doc: dict[str, Any] = {
        "architectures": ["MllamaForCausalLM"],
        "model_type": "mllama_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": cfg.activation,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": rope,
        "cross_attention_layers": cross_layers,
        "tie_word_embeddings": False,
        "pad_token_id": pad,
        "use_cache": True,
    }
    for name in ("bos_token_id", "eos_token_id"):
        if base.get(name) is not None:
            doc[name] = base[name]
        else:
            notes.append(f"the base's config names no {name}: set it in config.json (Mllama's default is Llama 3's)")
    if dtype in _DTYPE_NAMES:
        doc["dtype"] = _DTYPE_NAMES[dtype]
    return doc


def mllama_quantization_config(src: Source, layer_map: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The base's ``quantization_config`` for the Mllama export (None for a float base): its list's entries
    naming a decoder layer renumbered to Mllama's stack, and each cross-attention layer's ``cross_attn`` and
    ``mlp`` added by the loader's rule (``arch.quantization.skip_fusion_modules``), so no loader quantizes them."""
    quant = read_quantization(base_config_of(src.ckpt.config or {}))  # the base's own list, not the fused one
    if quant is None:
        return None
    number = {m["source_layer"]: m["mllama_layer"] for m in layer_map if m["kind"] == "self"}
    prefix = "model.layers."

    def renumbered(entry: Any) -> Any:
        if isinstance(entry, str) and entry.startswith(prefix):
            head, _, rest = entry[len(prefix):].partition(".")
            if head.isdigit() and int(head) in number:
                return f"{prefix}{number[int(head)]}" + (f".{rest}" if rest else "")
        return entry

    config = dict(quant.config)
    for field in quant.skip_fields:
        if isinstance(config.get(field), list):
            config[field] = [renumbered(e) for e in config[field]]
    cross = [f"{prefix}{m['mllama_layer']}.{part}" for m in layer_map if m["kind"] == "cross"
             for part in ("cross_attn", "mlp")]
    return skip_fusion_modules(Quantization(quant.method, quant.bits, quant.detail, config), cross,
                               float_linears=["lm_head"])


def export_mllama(src: Source, out: Path, *, force: bool = False, progress: Progress | None = None) -> ExportResult:
    """Write ``src`` as an Mllama checkpoint. One that ``import`` made (or a graft of its adapter) comes back
    in the layout it was imported from, with its vision tower and projector, as ``MllamaForConditionalGeneration``
    when the source was one."""
    src = as_llama(src)
    check_supported(src)
    tensors, layer_map, notes = plan_mllama(src)
    cross = [m["mllama_layer"] for m in layer_map if m["kind"] == "cross"]
    origin = read_origin(src.ckpt, src.manifest)
    config = mllama_config(src, len(layer_map), cross, notes, origin_pad(origin))
    quantized = mllama_quantization_config(src, layer_map)
    if quantized is not None:
        config["quantization_config"] = quantized
        notes.append(f"quantized base ({quantized['quant_method']}): its tensors keep their bytes under Mllama's "
                     "names; the cross-attention layers are kept out of quantization in config.json")
    reader = src.ckpt
    if origin is not None:
        for t in tensors:
            t.key = origin.layout.text_key(t.key)
        config = origin_config(origin, config)
        if origin.vision is not None:
            reader = Checkpoint.combine(src.ckpt, origin.vision)
            tensors += [same(origin.vision, k, k) for k in origin.vision.keys()]
            notes.append(f"vision tower and projector: {len(origin.vision.keys())} tensor(s) carried from "
                         f"{VISION_DIR}/ as they are")
    result = ExportResult(out, "mllama", src.cfg.family, notes=notes, layer_map=layer_map)
    with AtomicDirectory(out, force=force) as staging:
        tmp = staging.tmp
        files, digests = write_source_tensors(src, tensors, tmp, notes, progress, reader=reader)
        if origin is not None:
            changed = sorted(k for k, d in origin.vision_digests.items() if d and digests.get(k) != d)
            if changed:
                notes.append(f"{len(changed)} vision tensor(s) differ from the digests recorded at import "
                             f"(trained since?): {listed(changed, 3)}")
        if len(set(files.values())) > 1:
            write_json(tmp / INDEX_NAME, index_doc(files, tensors))
        write_json(tmp / CONFIG_NAME, public_config(config))
        carried = copy_sidecars(src.ckpt, tmp)
        if not any(n.startswith("tokenizer") for n in carried):
            notes.append("no tokenizer files beside the source: add the base's tokenizer before serving")
        entries = tensor_entries(tensors, files, digests)
        write_json(tmp / EXPORT_MANIFEST_NAME, export_manifest(
            src, "mllama", entries, notes, {"layer_map": layer_map, "cross_attention_layers": cross}))
        result.tensors = entries
        result.files = listed_files(tmp)
        staging.commit()
    return result
