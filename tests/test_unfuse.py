"""unfuse: the base back, bit for bit, with its config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.errors import UsageError
from fusionsurgery.exporting import export, unfuse
from helpers import hf_model, make_base, read_json, same_checkpoint, save_sharded


def test_single_file_base_comes_back_byte_for_byte(tmp_path):
    base, _ = make_base(tmp_path, "llama", dtype=torch.bfloat16)
    (base / "tokenizer.json").write_text("{}")
    fs.fuse(base, tmp_path / "fused", every=2, fusion_vocab=4)
    result = unfuse(tmp_path / "fused", tmp_path / "back")
    out = tmp_path / "back"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    assert read_json(out / "config.json") == read_json(base / "config.json")
    assert len(result.removed) == 2 * 13 + 1 and not result.modified
    same_checkpoint(base, out)
    fs.fuse(out, tmp_path / "again", every=2)  # a base again: fusing it is allowed


def test_sharded_base_keeps_its_shards(tmp_path):
    base = tmp_path / "sharded"
    shards = save_sharded(hf_model("qwen3"), base)
    fs.fuse(base, tmp_path / "fused", every=2)
    unfuse(tmp_path / "fused", tmp_path / "back")
    for name in shards:
        assert (tmp_path / "back" / name).read_bytes() == (base / name).read_bytes(), name
    assert read_json(tmp_path / "back" / "model.safetensors.index.json")["weight_map"] == \
        read_json(base / "model.safetensors.index.json")["weight_map"]
    assert read_json(tmp_path / "back" / "config.json") == read_json(base / "config.json")


def test_mixed_shard_is_rewritten_without_fusion_tensors(tmp_path):
    """A fused checkpoint whose shard holds originals and fusion tensors together (e.g. re-saved by a trainer)."""
    base, _ = make_base(tmp_path, "llama")
    fs.fuse(base, tmp_path / "fused", every=2)
    merged = tmp_path / "merged"
    merged.mkdir()
    tensors = {**load_file(str(tmp_path / "fused" / "model.safetensors")),
               **load_file(str(tmp_path / "fused" / "fusion-00001-of-00001.safetensors"))}
    save_file(tensors, str(merged / "model.safetensors"), metadata={"format": "pt"})
    (merged / "config.json").write_text((tmp_path / "fused" / "config.json").read_text())
    unfuse(merged, tmp_path / "back")
    same_checkpoint(base, tmp_path / "back")
    assert read_json(tmp_path / "back" / "config.json") == read_json(base / "config.json")


def test_torchtune_export_unfuses_to_the_torchtune_base(tmp_path):
    base, _ = make_base(tmp_path, "llama")
    fs.fuse(base, tmp_path / "fused", every=2)
    export(tmp_path / "fused", tmp_path / "tune", to="torchtune")
    export(base, tmp_path / "tune-base", to="torchtune")
    unfuse(tmp_path / "tune", tmp_path / "back")
    same_checkpoint(tmp_path / "tune-base", tmp_path / "back")


def test_trained_originals_are_reported(tmp_path):
    base, _ = make_base(tmp_path, "llama")
    fs.fuse(base, tmp_path / "fused", every=2)
    path = tmp_path / "fused" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.norm.weight"] += 1
    save_file(tensors, str(path), metadata={"format": "pt"})
    result = unfuse(tmp_path / "fused", tmp_path / "back")
    assert result.modified == ["model.norm.weight"]
    assert "differ from the digests recorded at fusion" in result.notes[0]


def test_base_without_config_gets_none_back(tmp_path):
    base, _ = make_base(tmp_path, "llama")
    (base / "config.json").unlink()
    fs.fuse(base, tmp_path / "fused", every=2, num_heads=4)
    result = unfuse(tmp_path / "fused", tmp_path / "back")
    assert not (tmp_path / "back" / "config.json").exists()
    assert "no config.json" in result.notes[0]
    same_checkpoint(base, tmp_path / "back")


def test_refuses_what_is_not_fused(tmp_path, capsys):
    base, _ = make_base(tmp_path, "llama")
    with pytest.raises(UsageError, match="not a fused checkpoint"):
        unfuse(base, tmp_path / "x")
    assert main(["unfuse", str(base), "-o", str(tmp_path / "x")]) == 2
    assert "not a fused checkpoint" in capsys.readouterr().err
    fs.fuse(base, tmp_path / "adapter", every=2, adapter_only=True)
    with pytest.raises(UsageError, match="adapter"):
        unfuse(tmp_path / "adapter", tmp_path / "y")
    fs.fuse(base, tmp_path / "fused", every=2)
    with pytest.raises(UsageError, match="inside it"):
        unfuse(tmp_path / "fused", tmp_path / "fused" / "sub")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_json(tmp_path, capsys):
    base, _ = make_base(tmp_path, "llama")
    fs.fuse(base, tmp_path / "fused", every=2)
    assert main(["unfuse", str(tmp_path / "fused"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["output"].endswith("fused-unfused") and doc["removed_tensors"] == 26
    same_checkpoint(base, tmp_path / "fused-unfused")
