"""``inspect``: what a checkpoint is, from headers only, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusionsurgery.cli import main
from fusionsurgery.inspection import diff_keys, inspect_checkpoint
from fusionsurgery.io.checkpoint import Checkpoint
from fusionsurgery.surgery.fuse import fuse
from helpers import make_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, object]:
    return make_base(tmp_path_factory.mktemp("inspect"), "llama")


@pytest.fixture(scope="module")
def fused(llama) -> Path:
    base, _ = llama
    out = base.parent / "fused"
    fuse(base, out, layers="0,2", fusion_after=True, encoder_dim=48, fusion_vocab=5, init="xavier", seed=7,
         dtype="bf16")
    return out


def test_base_checkpoint_facts(llama) -> None:
    base, model = llama
    r = inspect_checkpoint(base)
    cfg = model.config
    assert (r.family, r.model_type, r.architecture) == ("hf", "llama", "LlamaForCausalLM")
    assert (r.num_layers, r.dim, r.intermediate_dim) == (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    assert (r.num_heads, r.num_kv_heads, r.head_dim) == (4, 2, 16)
    assert r.vocab_size == cfg.vocab_size and r.tie_embeddings is False
    assert r.num_params == sum(p.numel() for p in model.parameters())
    assert r.dtypes == {"F32": r.num_params} and r.nbytes == 4 * r.num_params
    assert r.files == [{"name": "model.safetensors", "bytes": (base / "model.safetensors").stat().st_size,
                        "tensors": len(model.state_dict())}]
    assert r.fusion is None and not r.is_fused


def test_fused_checkpoint_facts(fused: Path, llama) -> None:
    base, model = llama
    r = inspect_checkpoint(fused)
    f = r.fusion
    assert r.is_fused and f is not None
    assert f.layers == [0, 2] and f.placement == "after" and f.encoder_dim == 48 and f.fusion_vocab == 5
    manifest = json.loads((fused / "fusion_manifest.json").read_text())
    per_layer = {}
    for t in manifest["new_tensors"]:
        if t["layer"] is not None:
            per_layer[t["layer"]] = per_layer.get(t["layer"], 0) + t["numel"]
    assert f.params_per_layer == per_layer
    assert f.embedding_params == 5 * 64
    assert f.fusion_params == manifest["totals"]["fusion_params"]
    assert f.base_params == sum(p.numel() for p in model.parameters())
    assert f.percent_of_base == pytest.approx(100 * f.fusion_params / f.base_params, abs=1e-3)
    assert (f.init, f.seed, f.dtype, f.has_manifest) == ("xavier", 7, "BF16", True)
    assert r.dtypes == {"BF16": f.fusion_params, "F32": f.base_params}
    assert r.has_index and {x["name"] for x in r.files} == {"model.safetensors", "fusion-00001-of-00001.safetensors"}
    doc = r.to_dict()
    assert doc["is_fused"] and doc["fusion"]["params_per_layer"] == {"0": per_layer[0], "2": per_layer[2]}


def test_base_diff_and_tensor_list(fused: Path, llama, tmp_path: Path) -> None:
    base, _ = llama
    r = inspect_checkpoint(fused, base=base, tensors=True)
    manifest = json.loads((fused / "fusion_manifest.json").read_text())
    assert {a["name"] for a in r.diff.added} == {t["name"] for t in manifest["new_tensors"]}
    assert r.diff.removed == [] and r.diff.changed == []
    assert r.diff.unchanged == len(manifest["original_tensors"])
    ckpt = Checkpoint.open(fused)
    assert len(r.tensors) == len(ckpt.keys())
    row = next(t for t in r.tensors if t["name"] == "model.embed_tokens.fusion_embedding.weight")
    assert row == {"name": row["name"], "shape": [5, 64], "dtype": "BF16", "file": "fusion-00001-of-00001.safetensors"}

    # a changed dtype, a changed shape and a removed key show up as such
    other = tmp_path / "edited"
    other.mkdir()
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.bfloat16)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:100].clone()
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(other / "model.safetensors"))
    d = diff_keys(Checkpoint.open(base), Checkpoint.open(other), str(base))
    assert [x["name"] for x in d.removed] == ["model.layers.1.mlp.up_proj.weight"] and d.added == []
    changed = {c.name: (c.base_shape, c.shape, c.base_dtype, c.dtype) for c in d.changed}
    assert changed == {"model.norm.weight": ([64], [64], "F32", "BF16"),
                       "lm_head.weight": ([128, 64], [100, 64], "F32", "F32")}


def test_single_file_tied_embeddings_and_no_config(tmp_path: Path) -> None:
    base, model = make_base(tmp_path, "qwen2")
    r = inspect_checkpoint(base / "model.safetensors")
    assert r.tie_embeddings is True and r.model_type == "qwen2" and r.num_heads == 4
    (base / "config.json").unlink()
    bare = inspect_checkpoint(base)
    assert bare.num_heads is None and bare.num_layers == 4 and bare.dim == 64
    assert any("`num_heads`" in n for n in bare.notes)  # the CLI prints it as --num-heads


def test_reads_headers_only(fused: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(Checkpoint, "read_bytes", refuse)
    monkeypatch.setattr(Checkpoint, "read_tensor", refuse)
    assert inspect_checkpoint(fused, tensors=True).is_fused


def test_inspect_never_imports_torch(fused: Path) -> None:
    code = ("import sys; from fusionsurgery.cli import main; import fusionsurgery.inspection, fusionsurgery.cli.inspect_cmd; "
            f"rc = main(['inspect', {str(fused)!r}, '--tensors', '--json']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fusion"]["layers"] == [0, 2]


def test_cli_report_and_errors(fused: Path, llama, capsys) -> None:
    base, _ = llama
    assert main(["inspect", str(fused), "--base", str(base)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the console's line wrapping
    for text in ("fused checkpoint", "Fusion layers", "after", "encoder width 48", "init xavier", "seed 7",
                 "27 added, 0 removed, 0 changed"):
        assert text in out, text
    assert main(["inspect", str(base.parent / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["inspect", str(fused), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 4
