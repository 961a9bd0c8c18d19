"""A fused checkpoint missing a tensor, or holding one of another shape, is refused by every entry point;
a fused model's fusion parameters are never left uninitialised.

Damaged copies of a tiny fused Llama (native modules), GPT-2 and Gemma 3 (transformers' forward only): one
fusion tensor removed from its shard and the index, one original tensor removed, one of each in
another shape. ``fusionsurgery.hf.from_pretrained``, ``load_fused``, ``verify``, ``export`` (every
target), ``unfuse`` and ``graft`` each refuse them in one line naming the tensor (``verify``: a failed
check), write nothing, and transformers' own multi-line load report never reaches the user. A fused
class built from its config, or read by transformers' own ``from_pretrained`` from a directory that
lacks its fusion tensors, starts its fusion blocks as the fusion section says (gates exactly zero).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.errors import CheckpointError, FusionSurgeryError
from fusionsurgery.io.checkpoint import Checkpoint
from fusionsurgery.io.safetensors_format import read_header
from helpers import error_lines, make_base, run_cli, tokens, tree_digest

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fusionsurgery.hf")
from any_decoder import save_tiny  # noqa: E402  (needs transformers)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

#: per base type: its layer prefix and the original tensor each damage touches
TYPES = {
    "llama": ("model.layers", "model.layers.2.mlp.up_proj.weight"),
    "gpt2": ("transformer.h", "transformer.h.2.mlp.c_fc.weight"),
    "gemma3_text": ("model.layers", "model.layers.2.mlp.up_proj.weight"),
}
DAMAGES = ("fusion tensor removed", "original tensor removed", "fusion tensor misshaped", "original tensor misshaped")
EXPORT_TARGETS = ("mllama", "torchtune", "hf")


def damaged_key(model_type: str, damage: str) -> str:
    prefix, original = TYPES[model_type]
    return f"{prefix}.1.fusion_layer.cross_attn_attn_gate" if damage.startswith("fusion") else original


def damage_copy(src: Path, dst: Path, key: str, misshape: bool) -> Path:
    """A copy of ``src`` whose shard holding ``key`` is rewritten without it (or with a [3] tensor in its place),
    its index (when it has one) and total size told the same: what a truncated upload or a hand edit leaves."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    name = index["weight_map"][key] if index else next(p.name for p in dst.glob("*.safetensors")
                                                        if key in read_header(p).tensors)
    with safe_open(dst / name, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(dst / name)
    if misshape:
        tensors[key] = torch.zeros(3, dtype=tensors[key].dtype)
    else:
        del tensors[key]
    save_file(tensors, dst / name, metadata=metadata)
    if index:
        if not misshape:
            del index["weight_map"][key]
        files = set(index["weight_map"].values())
        index["metadata"]["total_size"] = sum(t.nbytes for f in files for t in read_header(dst / f).tensors.values())
        index_path.write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module", params=list(TYPES))
def world(request, tmp_path_factory):
    """A tiny base of the type, its fusion at layers 1 and 3 and its adapter, and a maker of damaged copies."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    base = make_base(root, "llama")[0] if model_type == "llama" else save_tiny(model_type, root / "base")
    fused, adapter = root / "fused", root / "adapter"
    fs.fuse(base, fused, seed=1, layers="1,3")
    fs.fuse(base, adapter, seed=1, layers="1,3", adapter_only=True)
    made: dict[tuple[str, str], Path] = {}

    def damaged(which: str, damage: str) -> Path:
        """``which`` (fused, adapter or base) with ``damage`` done to it (made once)."""
        if (which, damage) not in made:
            src = {"fused": fused, "adapter": adapter, "base": base}[which]
            made[which, damage] = damage_copy(src, root / f"{which}-{damage.replace(' ', '-')}",
                                              damaged_key(model_type, damage), damage.endswith("misshaped"))
        return made[which, damage]

    return model_type, base, fused, adapter, damaged


class Held(logging.Handler):
    """Collects what transformers logs during a load."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(record.getMessage())


def refused_by_hf(call, key: str) -> str:
    """Run ``call``; it must raise a one-line CheckpointError naming ``key``, with no transformers report logged."""
    held = Held()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(held)
    try:
        with pytest.raises(CheckpointError) as info:
            call()
    finally:
        logger.removeHandler(held)
    message = str(info.value)
    assert "\n" not in message and key in message, message
    assert not [t for t in held.text if "LOAD REPORT" in t or "ignore_mismatched_sizes" in t], held.text
    return message


def assert_refused(code: int, err: str, key: str, out: Path) -> None:
    """Exit 2, one ``error:`` line naming ``key``, no traceback, nothing written at ``out`` or beside it."""
    assert code == 2, err
    assert "Traceback" not in err and len(error_lines(err)) == 1 and key in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- every entry point refuses every damage
@pytest.mark.parametrize("damage", DAMAGES)
def test_hf_from_pretrained_refuses_in_one_line(world, damage):
    model_type, _, _, _, damaged = world
    key = damaged_key(model_type, damage)
    refused_by_hf(lambda: hf.from_pretrained(damaged("fused", damage), dtype=torch.float32), key)


@pytest.mark.parametrize("damage", [d for d in DAMAGES if d.startswith("fusion")])
def test_hf_refuses_a_damaged_adapter_on_its_base(world, damage):
    model_type, base, _, _, damaged = world
    refused_by_hf(lambda: hf.from_pretrained(damaged("adapter", damage), base=base, dtype=torch.float32),
                  damaged_key(model_type, damage))


def test_hf_refuses_what_only_transformers_sees(world, tmp_path):
    """Without a manifest to list the originals, transformers' own account of the load is the check: an
    original tensor missing, or one the model has no parameter for, is refused in one line before any
    model is handed back (and its report is not logged)."""
    model_type, _, _, _, damaged = world
    key = damaged_key(model_type, "original tensor removed")
    missing = tmp_path / "missing"
    shutil.copytree(damaged("fused", "original tensor removed"), missing)
    (missing / "fusion_manifest.json").unlink()
    message = refused_by_hf(lambda: hf.from_pretrained(missing, dtype=torch.float32), key)
    if model_type != "llama":  # (a native type's own shape check names it first)
        assert "missing" in message and "transformers" in message, message
    extra = tmp_path / "extra"
    shutil.copytree(world[2], extra)
    (extra / "fusion_manifest.json").unlink()
    shard = extra / "model.safetensors"
    tensors = load_file(shard)
    tensors["stray.weight"] = torch.ones(2)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((extra / "model.safetensors.index.json").read_text())
    index["weight_map"]["stray.weight"] = "model.safetensors"
    index["metadata"]["total_size"] += 8
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    refused_by_hf(lambda: hf.from_pretrained(extra, dtype=torch.float32), "stray.weight")


@pytest.mark.parametrize("damage", DAMAGES)
def test_load_fused_refuses(world, damage):
    model_type, _, _, _, damaged = world
    with pytest.raises(FusionSurgeryError) as info:
        fs.load_fused(damaged("fused", damage))
    assert "\n" not in str(info.value)
    if model_type == "llama":  # (a type without native modules is refused for that, before its tensors are read)
        assert damaged_key(model_type, damage) in str(info.value), info.value


@pytest.mark.parametrize("damage", DAMAGES)
def test_verify_fails_its_structure_check(world, damage, capsys):
    model_type, _, _, _, damaged = world
    d = damaged("fused", damage)
    before = tree_digest(d)
    report = fs.verify(d, device="cpu")
    structure = next(c for c in report.checks if c.name == "structure")
    assert structure.failed and any(damaged_key(model_type, damage) in line for line in structure.details)
    code = main(["verify", str(d), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err + captured.out, captured.err
    assert "FAILED" in captured.out and damaged_key(model_type, damage) in " ".join(captured.out.split())
    assert tree_digest(d) == before


@pytest.mark.parametrize("target", EXPORT_TARGETS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_export_refuses(world, damage, target, tmp_path, capsys):
    model_type, _, _, _, damaged = world
    out = tmp_path / "out"
    code, err = run_cli(["export", str(damaged("fused", damage)), "--to", target, "-o", str(out)], capsys)
    assert_refused(code, err, damaged_key(model_type, damage), out)


@pytest.mark.parametrize("damage", DAMAGES)
def test_unfuse_refuses(world, damage, tmp_path, capsys):
    model_type, _, _, _, damaged = world
    out = tmp_path / "out"
    code, err = run_cli(["unfuse", str(damaged("fused", damage)), "-o", str(out)], capsys)
    assert_refused(code, err, damaged_key(model_type, damage), out)


@pytest.mark.parametrize("damage", DAMAGES)
def test_graft_refuses(world, damage, tmp_path, capsys):
    """A damaged adapter (its fusion tensors) onto its base, or the adapter onto a damaged base (its originals)."""
    model_type, base, _, adapter, damaged = world
    if damage.startswith("fusion"):
        adapter, onto = damaged("adapter", damage), base
    else:
        onto = damaged("base", damage)
    out = tmp_path / "out"
    code, err = run_cli(["graft", str(adapter), "--onto", str(onto), "-o", str(out)], capsys)
    assert_refused(code, err, damaged_key(model_type, damage), out)


def test_the_undamaged_checkpoints_pass_everywhere(world, tmp_path):
    """The same inputs undamaged: every entry point above takes them (the refusals are about the damage)."""
    model_type, base, fused, adapter, _ = world
    model = hf.from_pretrained(fused, dtype=torch.float32)
    assert not fs.verify(fused, device="cpu").failures
    fs.unfuse(fused, tmp_path / "unfused")
    fs.graft(adapter, base, tmp_path / "grafted")
    hf.from_pretrained(tmp_path / "grafted", dtype=torch.float32)
    if model_type == "llama":
        fs.load_fused(fused)
        fs.export(fused, tmp_path / "tt", to="torchtune")
    assert all((p == 0).all() for n, p in model.named_parameters() if n.endswith("_gate"))


# ---------------------------------------------------------------- no fusion parameter left uninitialised
INIT_TYPES = {"llama": dict(fusion_vocab=2), "gpt2": {}, "gemma3_text": {}}


@pytest.fixture(scope="module", params=list(INIT_TYPES))
def fused_of(request, tmp_path_factory):
    """(type, base directory, a function fusing it with the given options and returning the output)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(f"init-{model_type}")
    base = make_base(root, "llama")[0] if model_type == "llama" else save_tiny(model_type, root / "base")

    def fused(**options) -> Path:
        out = root / ("fused-" + "-".join(f"{k}{v}" for k, v in sorted(options.items())))
        if not out.exists():
            fs.fuse(base, out, seed=1, every=2, **{**INIT_TYPES[model_type], **options})
        return out

    return model_type, base, fused


def fusion_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "fusion_layer" in n or "fusion_embedding" in n}


def assert_section_init(model, section: fs.FusionConfig, tolerance: float = 0.2) -> None:
    """The fusion parameters are what the fusion section's init makes: gates exactly 0, norms an effective
    scale of one, projections drawn with the section's distribution, the fusion vocabulary normal(init_std)."""
    params = fusion_parameters(model)
    assert params
    offset = section.norm_offset or 0.0
    for name, p in params.items():
        assert torch.isfinite(p).all(), name
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            assert (p == 0).all(), (name, p)
        elif "norm" in name:
            assert (p == 1.0 - offset).all(), (name, p)
        elif section.init == "xavier" and "fusion_embedding" not in name:  # (the vocabulary is drawn normal)
            bound = (6.0 / (p.shape[0] + p.shape[1])) ** 0.5
            assert p.abs().max() <= bound and abs(p.std().item() - bound / 3 ** 0.5) < tolerance * bound, name
        else:
            assert abs(p.std().item() - section.init_std) < tolerance * section.init_std, (name, p.std())
            assert abs(p.mean().item()) < 5 * section.init_std / p.numel() ** 0.5 + 1e-6, (name, p.mean())


@pytest.mark.parametrize("build", ["class", "_from_config"])
@pytest.mark.parametrize("init", ["normal", "xavier"])
def test_a_model_built_from_its_config_starts_as_its_fusion_section_says(fused_of, build, init):
    model_type, _, fused = fused_of
    out = fused(init=init, init_std=0.05)
    cls = hf.model_class(Checkpoint.open(out))
    config = transformers.AutoConfig.from_pretrained(out)
    torch.manual_seed(0)
    model = cls(config) if build == "class" else cls._from_config(config)
    section = fs.FusionConfig.from_dict(config.fusion)
    assert section.init == init and section.init_std == 0.05
    assert_section_init(model, section)
    if model_type == "gemma3_text":
        assert section.norm_offset == 1.0  # Gemma's 1 + w: the stored norms start at 0


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_init_copy_copies_the_wrapped_layers_weights(arch, tmp_path):
    """``init: copy``: each projection is the wrapped layer's own (Phi-3: its rows of the fused qkv / gate_up)."""
    base = make_base(tmp_path, arch)[0]
    out = tmp_path / "fused"
    fs.fuse(base, out, seed=1, every=2, init="copy", fusion_vocab=2)
    config = transformers.AutoConfig.from_pretrained(out)
    model = hf.model_class(Checkpoint.open(out))(config)
    q, kv, inter = config.hidden_size, config.num_key_value_heads * config.hidden_size // config.num_attention_heads, \
        config.intermediate_size
    for i in fs.FusionConfig.from_dict(config.fusion).layers:
        layer = model.model.layers[i]
        if arch == "phi3":
            qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
            sources = {"cross_attn.q_proj": qkv[:q], "cross_attn.k_proj": qkv[q:q + kv],
                       "cross_attn.v_proj": qkv[q + kv:], "mlp.gate_proj": gate_up[:inter],
                       "mlp.up_proj": gate_up[inter:]}
        else:
            sources = {"cross_attn.q_proj": layer.self_attn.q_proj.weight,
                       "cross_attn.v_proj": layer.self_attn.v_proj.weight, "mlp.up_proj": layer.mlp.up_proj.weight}
        sources.update({"cross_attn.o_proj": layer.self_attn.o_proj.weight, "mlp.down_proj": layer.mlp.down_proj.weight})
        for mine, theirs in sources.items():
            torch.testing.assert_close(layer.fusion_layer.get_submodule(mine).weight, theirs, rtol=0, atol=0)
        assert (layer.fusion_layer.cross_attn_attn_gate == 0).all()
    table = model.get_input_embeddings().fusion_embedding.weight  # drawn normal, as fuse draws it
    assert abs(table.std().item() - 0.02) < 0.01


def test_transformers_own_loader_gives_missing_fusion_tensors_their_init(fused_of):
    """transformers' ``from_pretrained`` on the fused class, pointed at the fused directory itself, reads its
    ``model.safetensors`` (the original tensors) and not the fusion shard: every fusion parameter is missing
    there, and gets the fusion section's init (never uninitialised memory), so the model computes the base."""
    model_type, base, fused = fused_of
    out = fused()
    cls = hf.model_class(Checkpoint.open(out))
    torch.manual_seed(0)
    model, info = cls.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] and all("fusion" in k for k in info["missing_keys"])
    assert_section_init(model, fs.FusionConfig.from_dict(model.config.fusion), tolerance=0.35)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ids = tokens(vocab=ref.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
