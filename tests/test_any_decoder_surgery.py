"""Issue 20, the surgery half: fuse / inspect / verify (no-forward checks) / unfuse, adapter-only,
link and graft on every decoder type transformers builds (``tests/any_decoder.py``), without
transformers in the commands; honest export refusals; the Mllama import hole.

Each type's tiny base is built once per module (about 0.1-2 s each); the whole file runs in about a
minute on 2 cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from any_decoder import ALL_TYPES, REFUSAL_WORDS, REFUSED, REQUIRED, build_model, save_tiny, type_params
from helpers import assert_clean_failure, error_lines, read_json, run_cli, same_checkpoint

from fusionsurgery.arch.model_types import ONE_PLUS_W_NORM_TYPES
from fusionsurgery.io.checkpoint import Checkpoint

#: Expected layer prefix and token-embedding key per type where they are not Llama's.
LAYOUT = {
    "gpt2": ("transformer.h", "transformer.wte.weight"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.embed_in.weight"),
}
LLAMA_LAYOUT = ("model.layers", "model.embed_tokens.weight")
FUSION_SUFFIXES = {
    "cross_attn.q_proj.weight", "cross_attn.k_proj.weight", "cross_attn.v_proj.weight", "cross_attn.o_proj.weight",
    "cross_attn.q_norm.weight", "cross_attn.k_norm.weight", "input_layernorm.weight",
    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "cross_attn_attn_gate", "cross_attn_mlp_gate",
}


def oracle_layout(model_type: str) -> tuple[str, str]:
    """(layer prefix, embedding key) as transformers' own model says: its input embedding's name and
    the name of the module list that holds its decoder layers (the longest list of blocks)."""
    import torch

    model = build_model(model_type)
    embedding = model.get_input_embeddings().weight
    embedding_key = next(n for n, p in model.named_parameters() if p is embedding)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    prefix = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))[0]
    return prefix, embedding_key


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """model type -> a tiny saved base (built on first use)."""
    root = tmp_path_factory.mktemp("any-decoder")
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = save_tiny(model_type, root / model_type)
        return cache[model_type]

    return get


def _keys(path: Path) -> set[str]:
    return set(Checkpoint.open(path).keys())


def _json_cli(args: list[str], capsys) -> tuple[int, dict]:
    from fusionsurgery.cli import main

    code = main(args)
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else {}


@pytest.mark.parametrize("model_type", type_params())
def test_fuse_inspect_verify_unfuse(model_type, bases, tmp_path, capsys, monkeypatch):
    from fusionsurgery.verification import runner
    from fusionsurgery.verification.engine import Engine

    # the no-forward checks only: the forward through transformers is test_any_decoder_forward.py's
    monkeypatch.setattr(runner, "forward_engine", lambda cfg, doc=None: Engine("skip", "forward checks left out here"))
    base = bases(model_type)
    fused, back = tmp_path / "fused", tmp_path / "unfused"
    code, err = run_cli(["fuse", str(base), "--every", "2", "-o", str(fused)], capsys)
    assert code == 0, err

    # the fusion section: every reader builds the same block without knowing the type
    doc, base_doc = read_json(fused / "config.json"), read_json(base / "config.json")
    section = doc.pop("fusion")
    assert doc == base_doc
    prefix, embedding = LAYOUT.get(model_type, LLAMA_LAYOUT) if model_type in REQUIRED else oracle_layout(model_type)
    on_disk = _keys(base)
    if model_type in REQUIRED or (embedding in on_disk and any(k.startswith(prefix + ".0.") for k in on_disk)):
        assert (section["layer_prefix"], section["embedding_key"]) == (prefix, embedding)
    else:  # saved under other names than the modules' (transformers' checkpoint conversion)
        prefix = section["layer_prefix"]
        assert {int(k[len(prefix) + 1:].split(".")[0]) for k in on_disk if k.startswith(prefix + ".")} == {0, 1, 2, 3}
    assert section["layers"] == [1, 3]
    assert section["dim"] == 64 and section["num_heads"] >= 1 and section["head_dim"] >= 1
    assert section["num_heads"] % section["num_kv_heads"] == 0
    assert section["norm_offset"] == (1.0 if model_type in ONE_PLUS_W_NORM_TYPES else 0.0)
    assert section["activation"] in ("silu", "gelu", "gelu_pytorch_tanh")

    # the new tensors sit under the layer prefix, in the HF column; the originals are untouched
    added = _keys(fused) - _keys(base)
    assert _keys(base) <= _keys(fused)
    assert added == {f"{prefix}.{i}.fusion_layer.{s}" for i in (1, 3) for s in FUSION_SUFFIXES}

    code, summary = _json_cli(["inspect", str(fused), "--json"], capsys)
    assert code == 0
    assert summary["model_type"] == base_doc["model_type"] and summary["is_fused"]
    assert summary["fusion"]["layers"] == [1, 3] and summary["forward"] == "transformers"
    assert summary["layer_prefix"] == prefix and summary["num_layers"] == 4
    code, out = _json_cli(["inspect", str(base), "--json"], capsys)
    assert code == 0 and not out["is_fused"]
    from fusionsurgery.cli import main

    assert main(["inspect", str(fused)]) == 0
    table = capsys.readouterr().out
    assert f"under {prefix}.N." in table and "transformers' own class" in table

    code, report = _json_cli(["verify", str(fused), "--json"], capsys)
    assert code == 0, report
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["structure"]["status"] == "passed" and checks["originals"]["status"] == "passed"
    assert report["settings"]["engine"] == "skip"
    assert all(checks[n]["status"] == "skipped" for n in ("identity", "live", "backward", "kv_cache"))
    assert checks["gates"]["status"] == "passed" and checks["gates"]["figures"] == {"gates": 4, "open": 0,
                                                                                    "max_abs_tanh": 0.0}

    code, err = run_cli(["unfuse", str(fused), "-o", str(back)], capsys)
    assert code == 0, err
    same_checkpoint(base, back)
    assert read_json(back / "config.json") == base_doc


def test_every_issue_type_is_listed():
    assert len(REQUIRED) == 24 and set(REQUIRED) <= set(ALL_TYPES)


@pytest.mark.parametrize("model_type", type_params(list(REFUSED)))
def test_types_without_one_layer_list_are_refused_clearly(model_type, tmp_path, capsys):
    base = save_tiny(model_type, tmp_path / model_type)
    capsys.readouterr()
    code, err = run_cli(["fuse", str(base), "--every", "2"], capsys)
    words = REFUSAL_WORDS.get(model_type, "no numbered list of")
    assert_clean_failure(code, err, tmp_path, contains=words)
    code, err = run_cli(["inspect", str(base)], capsys)
    assert code == 2 and words in err


@pytest.mark.parametrize("model_type", type_params(["gemma3_text", "gpt2", "qwen3_moe"]))
def test_adapter_only_link_and_graft(model_type, bases, tmp_path, capsys):
    base = bases(model_type)
    adapter, linked, grafted = tmp_path / "adapter", tmp_path / "linked", tmp_path / "grafted"
    assert run_cli(["fuse", str(base), "--every", "2", "--adapter-only", "-o", str(adapter)], capsys)[0] == 0
    assert _keys(adapter) == {k for k in _keys(adapter) if ".fusion_layer." in k} and _keys(adapter)
    code, summary = _json_cli(["inspect", str(adapter), "--json"], capsys)
    assert code == 0 and summary["fusion"]["layers"] == [1, 3] and summary["layer_prefix"]

    assert run_cli(["fuse", str(base), "--every", "2", "--link", "-o", str(linked)], capsys)[0] == 0
    shard = next(p for p in linked.iterdir() if p.name == "model.safetensors")
    assert shard.stat().st_nlink > 1  # hard-linked, not copied

    code, err = run_cli(["graft", str(adapter), "--onto", str(base), "-o", str(grafted)], capsys)
    assert code == 0, err
    for key in _keys(linked):  # a graft of the adapter onto its own base is the fused checkpoint
        a, b = Checkpoint.open(linked), Checkpoint.open(grafted)
        assert a.read_bytes(key) == b.read_bytes(key), key
    code, report = _json_cli(["verify", str(grafted), "--json"], capsys)
    assert code == 0 and {c["name"]: c["status"] for c in report["checks"]}["structure"] == "passed"
    code, report = _json_cli(["verify", str(adapter), "--base", str(base), "--json"], capsys)
    assert code == 0, report

    from fusionsurgery.transplant.graft import graft

    drift = graft(adapter, base, tmp_path / "again", was=base).drift
    assert {t.layer for t in drift.tensors} == {None, 0, 1, 2, 3}  # every layer's tensors found, whatever named
    assert all(t.identical for t in drift.tensors)


def test_graft_refuses_another_shape(bases, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert run_cli(["fuse", str(bases("gemma3_text")), "--every", "2", "--adapter-only", "-o", str(adapter)],
                   capsys)[0] == 0
    other = save_tiny("gemma3_text", tmp_path / "wide", hidden_size=96)
    code, err = run_cli(["graft", str(adapter), "--onto", str(other), "-o", str(tmp_path / "g")], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "differ" in err


@pytest.mark.parametrize("model_type,key", [("gpt2", "transformer.wte.fusion_embedding.weight"),
                                            ("gpt_neox", "gpt_neox.embed_in.fusion_embedding.weight"),
                                            ("gemma3_text", "model.embed_tokens.fusion_embedding.weight")])
def test_fusion_vocab_finds_the_embedding(model_type, key, bases, tmp_path, capsys):
    out = tmp_path / "fused"
    assert run_cli(["fuse", str(bases(model_type)), "--every", "4", "--fusion-vocab", "3", "-o", str(out)],
                   capsys)[0] == 0
    ckpt = Checkpoint.open(out)
    assert ckpt.info(key).shape == (3, 64)
    code, summary = _json_cli(["inspect", str(out), "--json"], capsys)
    assert code == 0 and summary["fusion"]["fusion_vocab"] == 3
    code, report = _json_cli(["verify", str(out), "--json"], capsys)
    assert code == 0


@pytest.mark.parametrize("model_type", ["granite", "olmo2"])
def test_init_copy_where_the_layer_is_llama_shaped(model_type, bases, tmp_path, capsys):
    base = bases(model_type)
    out = tmp_path / "fused"
    code, err = run_cli(["fuse", str(base), "--every", "2", "--init", "copy", "-o", str(out)], capsys)
    assert code == 0, err
    ckpt, src = Checkpoint.open(out), Checkpoint.open(base)
    for ours, theirs in (("cross_attn.q_proj", "self_attn.q_proj"), ("mlp.up_proj", "mlp.up_proj")):
        assert ckpt.read_bytes(f"model.layers.3.fusion_layer.{ours}.weight") == \
            src.read_bytes(f"model.layers.3.{theirs}.weight")


@pytest.mark.parametrize("model_type,missing", [("gpt2", "transformer.h.1.self_attn.q_proj.weight"),
                                                ("mixtral", "model.layers.1.mlp.gate_proj.weight"),
                                                ("deepseek_v3", "model.layers.1.self_attn.q_proj.weight")])
def test_init_copy_refused_where_there_is_nothing_to_copy(model_type, missing, bases, tmp_path, capsys):
    base = bases(model_type)
    capsys.readouterr()  # (transformers' own progress while saving the base)
    code, err = run_cli(["fuse", str(base), "--every", "2", "--init", "copy", "-o",
                         str(tmp_path / "x-fused")], capsys)
    assert_clean_failure(code, err, tmp_path, contains="--init copy")
    assert missing in err


def test_init_copy_refused_where_the_shapes_differ(tmp_path, capsys):
    """Gemma 4's global layers have their own head size: layer 3's q_proj is not the fusion block's."""
    base = save_tiny("gemma4_text", tmp_path / "g4", global_head_dim=32)
    capsys.readouterr()
    code, err = run_cli(["fuse", str(base), "--layers", "3", "--init", "copy", "-o", str(tmp_path / "x-fused")],
                        capsys)
    assert_clean_failure(code, err, tmp_path, contains="model.layers.3.self_attn.q_proj.weight is [128, 64]")
    assert run_cli(["fuse", str(base), "--layers", "1", "--init", "copy", "-o", str(tmp_path / "ok")], capsys)[0] == 0


@pytest.mark.parametrize("model_type", type_params(["gemma3_text", "gpt2"]))
def test_exports_stay_honest(model_type, bases, tmp_path, capsys):
    fused = tmp_path / "fused"
    assert run_cli(["fuse", str(bases(model_type)), "--every", "2", "-o", str(fused)], capsys)[0] == 0
    for target, words in (("mllama", "Llama-shaped"), ("torchtune", "not one this export covers"), ("hf", "already")):
        code, err = run_cli(["export", str(fused), "--to", target, "-o", str(tmp_path / f"out-{target}")], capsys)
        assert code == 2 and len(error_lines(err)) == 1 and words in err, err
        assert not (tmp_path / f"out-{target}").exists()


def test_bf16_base(tmp_path, capsys):
    import torch

    base = save_tiny("gemma3_text", tmp_path / "bf16", dtype=torch.bfloat16)
    fused = tmp_path / "fused"
    assert run_cli(["fuse", str(base), "--layers", "0,2", "-o", str(fused)], capsys)[0] == 0
    new = Checkpoint.open(fused).info("model.layers.2.fusion_layer.cross_attn.q_proj.weight")
    assert new.dtype == "BF16"
    # Gemma 3's 1 + w norms: the fusion norms start at zero (an effective scale of one)
    assert set(Checkpoint.open(fused).read_bytes("model.layers.0.fusion_layer.input_layernorm.weight")) == {0}
    code, report = _json_cli(["verify", str(fused), "--json"], capsys)
    assert code == 0


# ------------------------------------------------------------------ clear refusals
def _edit_config(path: Path, **changes) -> None:
    doc = read_json(path / "config.json")
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    (path / "config.json").write_text(json.dumps(doc))


def test_missing_head_count_is_named(tmp_path, capsys):
    base = save_tiny("gpt2", tmp_path / "gpt2")
    capsys.readouterr()
    _edit_config(base, n_head=None)
    code, err = run_cli(["fuse", str(base), "--every", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, contains="attention head count")
    assert "n_head" in err
    assert run_cli(["fuse", str(base), "--every", "2", "--num-heads", "4", "-o", str(tmp_path / "ok")], capsys)[0] == 0


def test_layer_count_disagreeing_with_the_tensors_is_named(tmp_path, capsys):
    base = save_tiny("olmo2", tmp_path / "olmo2")
    capsys.readouterr()
    _edit_config(base, num_hidden_layers=6)
    code, err = run_cli(["fuse", str(base), "--every", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, contains="6 decoder layers")
    code, err = run_cli(["inspect", str(base)], capsys)
    assert code == 2 and "6 decoder layers" in err


def test_missing_width_is_named(tmp_path, capsys):
    base = save_tiny("stablelm", tmp_path / "stablelm")
    capsys.readouterr()
    _edit_config(base, hidden_size=None)
    code, err = run_cli(["fuse", str(base), "--every", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, contains="no width")


def test_commands_never_import_transformers(bases, tmp_path):
    """fuse, inspect and unfuse in a fresh interpreter leave transformers unimported."""
    import subprocess

    base = bases("gemma3_text")
    script = (
        "import sys, fusionsurgery as fs\n"
        f"fs.fuse({str(base)!r}, {str(tmp_path / 'f')!r}, every=2)\n"
        f"from fusionsurgery.inspection import inspect_checkpoint; inspect_checkpoint({str(tmp_path / 'f')!r})\n"
        f"from fusionsurgery.exporting import unfuse; unfuse({str(tmp_path / 'f')!r}, {str(tmp_path / 'u')!r})\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ the Mllama import hole
def _rewrite_without(path: Path, drop: set[str], add: dict | None = None) -> None:
    from safetensors.torch import load_file, save_file

    for shard in path.glob("*.safetensors"):
        tensors = load_file(str(shard))
        kept = {k: v for k, v in tensors.items() if k not in drop}
        if add and shard.name == sorted(p.name for p in path.glob("*.safetensors"))[0]:
            kept.update(add)
        if kept != tensors:
            save_file(kept, str(shard), metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        doc = json.loads(index.read_text())
        first = sorted(p.name for p in path.glob("*.safetensors"))[0]
        doc["weight_map"] = {k: v for k, v in doc["weight_map"].items() if k not in drop}
        doc["weight_map"].update({k: first for k in (add or {})})
        index.write_text(json.dumps(doc))


@pytest.fixture
def mllama_vision(tmp_path):
    pytest.importorskip("transformers")
    from helpers import mllama_model

    path = tmp_path / "mllama"
    mllama_model(True).save_pretrained(str(path))
    return path


def test_import_refuses_missing_vision_tensors(mllama_vision, tmp_path, capsys):
    gone = next(k for k in Checkpoint.open(mllama_vision).keys() if "global_transformer.layers.0.gate_attn" in k)
    _rewrite_without(mllama_vision, {gone})
    code, err = run_cli(["import", str(mllama_vision), "-o", str(tmp_path / "imported")], capsys)
    assert code == 2 and len(error_lines(err)) == 1, err
    assert "vision" in err and gone in err and "missing" in err
    assert not (tmp_path / "imported").exists()


def test_import_refuses_the_whole_vision_tower_missing(mllama_vision, tmp_path, capsys):
    vision = {k for k in Checkpoint.open(mllama_vision).keys() if "vision_model." in k or "projector" in k}
    _rewrite_without(mllama_vision, vision)
    code, err = run_cli(["import", str(mllama_vision), "-o", str(tmp_path / "imported")], capsys)
    assert code == 2 and "promises a vision tower" in err and f"{len(vision)} of its {len(vision)}" in err


def test_import_refuses_extra_vision_tensors(mllama_vision, tmp_path, capsys):
    import torch

    key = next(k for k in Checkpoint.open(mllama_vision).keys() if k.endswith("transformer.layers.1.mlp.fc1.bias"))
    extra = key.replace("transformer.layers.1.", "transformer.layers.2.")
    _rewrite_without(mllama_vision, set(), {extra: torch.zeros(3)})
    code, err = run_cli(["import", str(mllama_vision), "-o", str(tmp_path / "imported")], capsys)
    assert code == 2 and "does not account for" in err and extra in err


def test_sharded_base_round_trip(tmp_path, capsys):
    """A base in several shards (an index): shards copied as they are, unfuse gives them back."""
    from any_decoder import build_model

    base = tmp_path / "sharded"
    build_model("gemma3_text").save_pretrained(str(base), max_shard_size="200KB")
    assert (base / "model.safetensors.index.json").exists()
    capsys.readouterr()
    fused, back = tmp_path / "fused", tmp_path / "back"
    assert run_cli(["fuse", str(base), "--every", "2", "-o", str(fused)], capsys)[0] == 0
    for shard in base.glob("model-*.safetensors"):
        assert (fused / shard.name).read_bytes() == shard.read_bytes()
    code, report = _json_cli(["verify", str(fused), "--json"], capsys)
    assert code == 0
    assert run_cli(["unfuse", str(fused), "-o", str(back)], capsys)[0] == 0
    same_checkpoint(base, back)


# ------------------------------------------------------------------ reading by meaning (no transformers)
def _hand_made(path: Path, config: dict, names: dict[str, tuple[int, ...]]) -> Path:
    """A checkpoint written by hand: ``names`` -> shape (random fp32), ``config`` as config.json."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(*s, generator=g) for k, s in names.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def _nested_vl(path: Path) -> Path:
    """A multimodal wrapper's layout: the decoder under model.language_model, sizes in text_config,
    a vision tower with its own numbered layers, per-layer head sizes as a list."""
    names = {"model.language_model.embed_tokens.weight": (50, 32), "model.language_model.norm.weight": (32,),
             "lm_head.weight": (50, 32), "model.vision_tower.patch.weight": (16, 12)}
    for i in range(3):
        names.update({f"model.language_model.layers.{i}.attn.wqkv.weight": (96, 32),
                      f"model.language_model.layers.{i}.ffn.weight": (32, 32)})
    for i in range(2):
        names[f"model.vision_tower.blocks.{i}.weight"] = (12, 12)
    config = {"model_type": "made_up_vl", "text_config": {"hidden_size": 32, "num_hidden_layers": 3,
                                                          "num_attention_heads": [4, 4, 2], "head_dim": 8,
                                                          "hidden_act": "gelu_new", "vocab_size": 50}}
    return _hand_made(path, config, names)


def test_any_layout_a_config_describes(tmp_path, capsys):
    base = _nested_vl(tmp_path / "vl")
    fused = tmp_path / "fused"
    assert run_cli(["fuse", str(base), "--every", "3", "--fusion-vocab", "2", "-o", str(fused)], capsys)[0] == 0
    section = read_json(fused / "config.json")["fusion"]
    assert section["layer_prefix"] == "model.language_model.layers"
    assert section["embedding_key"] == "model.language_model.embed_tokens.weight"
    assert (section["num_heads"], section["head_dim"], section["intermediate_dim"]) == (4, 8, 128)  # first layer's; 4 x width
    assert section["activation"] == "gelu_pytorch_tanh" and section["norm_offset"] == 0.0
    ckpt = Checkpoint.open(fused)
    assert ckpt.info("model.language_model.layers.2.fusion_layer.cross_attn.q_proj.weight").shape == (32, 32)
    assert ckpt.info("model.language_model.embed_tokens.fusion_embedding.weight").shape == (2, 32)
    assert run_cli(["unfuse", str(fused), "-o", str(tmp_path / "back")], capsys)[0] == 0
    same_checkpoint(base, tmp_path / "back")


def test_reading_by_meaning():
    from fusionsurgery.arch.discovery import find_embedding_key, find_layer_prefix
    from fusionsurgery.arch.fields import ConfigFields
    from fusionsurgery.errors import CheckpointError

    fields = ConfigFields({"n_embd": 48, "n_layer": 2, "text_config": {"num_key_value_heads": [2, 1]}})
    assert (fields.int_of("dim"), fields.int_of("num_layers"), fields.int_of("num_kv_heads")) == (48, 2, 2)
    with pytest.raises(CheckpointError, match="no attention head count .*num_attention_heads, n_head"):
        fields.int_of("num_heads", required=True)
    with pytest.raises(CheckpointError, match="n_layer is 0"):
        ConfigFields({"n_layer": 0}).int_of("num_layers")

    keys = [f"transformer.h.{i}.attn.weight" for i in range(3)] + ["transformer.h.0.mlp.experts.5.weight",
                                                                   "vision.blocks.0.w", "vision.blocks.1.w"]
    assert find_layer_prefix(keys, 3) == "transformer.h"
    assert find_layer_prefix(keys, 2) == "vision.blocks"
    with pytest.raises(CheckpointError, match="no numbered list of 5 decoder layers.*transformer.h"):
        find_layer_prefix(keys, 5)
    shapes = {"transformer.wte.weight": (10, 8), "transformer.wpe.weight": (16, 8),
              "transformer.h.0.embed_tokens.weight": (10, 8), "lm_head.weight": (10, 8)}
    assert find_embedding_key(shapes, "transformer.h", 8) == "transformer.wte.weight"
    with pytest.raises(CheckpointError, match="no token embedding of width 4"):
        find_embedding_key(shapes, "transformer.h", 4)


def test_without_a_config_only_the_llama_recipe_is_read(tmp_path, capsys):
    base = _nested_vl(tmp_path / "vl")
    (base / "config.json").unlink()
    code, err = run_cli(["fuse", str(base), "--every", "3"], capsys)
    assert_clean_failure(code, err, tmp_path, contains="any other decoder needs its config.json")


def test_verify_reads_opened_gates(bases, tmp_path, capsys):
    """A trained (opened) gate is reported from the files, as a note, not a failure."""
    import torch
    from safetensors.torch import load_file, save_file

    fused = tmp_path / "fused"
    assert run_cli(["fuse", str(bases("gpt2")), "--every", "2", "-o", str(fused)], capsys)[0] == 0
    shard = fused / "fusion-00001-of-00001.safetensors"
    tensors = load_file(str(shard))
    tensors["transformer.h.3.fusion_layer.cross_attn_mlp_gate"] = torch.tensor([0.5])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, report = _json_cli(["verify", str(fused), "--json"], capsys)
    assert code == 0
    gates = {c["name"]: c for c in report["checks"]}["gates"]
    assert gates["figures"]["open"] == 1 and abs(gates["figures"]["max_abs_tanh"] - 0.46211715726) < 1e-6
    assert "1 of 4 gate(s) open" in gates["notes"][0]
