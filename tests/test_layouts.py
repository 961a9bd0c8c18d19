"""fuse --link and --adapter-only give the same model as a full copy."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.errors import UsageError
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import hf_model, open_gates, save_sharded, tokens


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    base = tmp / "base"
    save_sharded(hf_model("llama"), base, "200KB")
    for name, kw in (("copy", {}), ("link", {"link": True}), ("adapter", {"adapter_only": True})):
        fs.fuse(base, tmp / name, every=2, seed=5, **kw)
    return tmp


def _shards(path):
    return sorted(p.name for p in path.glob("model-*.safetensors"))


def test_link_shares_the_base_files(outputs):
    base, link = outputs / "base", outputs / "link"
    assert _shards(link) == _shards(base)
    for name in _shards(base):
        assert os.stat(link / name).st_ino == os.stat(base / name).st_ino
    copy = json.loads((outputs / "copy" / "fusion_manifest.json").read_text())
    linked = json.loads((link / "fusion_manifest.json").read_text())
    assert linked["layout"] == "link" and copy["layout"] == "copy"
    assert linked["original_tensors"] == copy["original_tensors"]
    assert linked["new_tensors"] == copy["new_tensors"]


def test_adapter_holds_only_the_new_tensors(outputs):
    adapter = outputs / "adapter"
    assert not _shards(adapter) and not (adapter / "model.safetensors.index.json").exists()
    manifest = json.loads((adapter / "fusion_manifest.json").read_text())
    assert manifest["layout"] == "adapter"
    keys = Checkpoint.open(adapter).keys()
    assert keys and all(".fusion_layer." in k for k in keys)


def test_all_layouts_load_to_the_same_logits(outputs):
    t = tokens()
    enc = torch.randn(2, 5, 64)
    models = {
        "copy": fs.load_fused(outputs / "copy", dtype=torch.float32),
        "link": fs.load_fused(outputs / "link", dtype=torch.float32),
        "adapter": fs.load_fused(outputs / "adapter", dtype=torch.float32, base=outputs / "base"),
    }
    for m in models.values():
        open_gates(m, 0.3)
    with torch.no_grad():
        ref = models["copy"](t, encoder_input=enc)
        for name, m in models.items():
            assert torch.equal(m(t, encoder_input=enc), ref), name


def test_adapter_refuses_a_missing_or_different_base(outputs, tmp_path):
    with pytest.raises(UsageError, match="`base` BASE"):
        fs.load_fused(outputs / "adapter")
    other = tmp_path / "other"
    save_sharded(hf_model("llama", seed=1), other, "200KB")
    with pytest.raises(Exception, match="differs from the adapter's base"):
        fs.load_fused(outputs / "adapter", base=other)
    with pytest.raises(Exception, match="not an adapter"):
        fs.load_fused(outputs / "copy", base=outputs / "base")


def test_cli_link_and_adapter_flags(outputs, tmp_path, capsys):
    base = outputs / "base"
    assert main(["fuse", str(base), "--every", "2", "--link", "-o", str(tmp_path / "l")]) == 0
    assert "(link)" in capsys.readouterr().out
    assert main(["fuse", str(base), "--every", "2", "--link", "--adapter-only", "-o", str(tmp_path / "x")]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["fuse", str(base), "--every", "2", "--adapter-only", "--json", "-o", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "adapter"


def test_force_over_a_linked_output_keeps_the_base(outputs, tmp_path):
    base = outputs / "base"
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    out = tmp_path / "o"
    fs.fuse(base, out, every=2, link=True)
    fs.fuse(base, out, every=4, link=True, force=True)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_verify_and_inspect_accept_link_and_adapter_outputs(outputs, capsys):
    base = outputs / "base"
    assert main(["verify", str(outputs / "link"), "--device", "cpu"]) == 0
    assert main(["verify", str(outputs / "adapter"), "--base", str(base), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["verify", str(outputs / "adapter"), "--device", "cpu"]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["inspect", str(outputs / "adapter"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["is_fused"] and doc["fusion"]["layers"] == [1, 3] and doc["num_layers"] == 4
    assert doc["fusion"]["base_params"] > 0 and "adapter" in doc["notes"][0]
    assert main(["inspect", str(outputs / "adapter"), "--base", str(base), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["diff"]["removed"] == [] and len(doc["diff"]["added"]) == len(Checkpoint.open(outputs / "adapter").keys())


def test_verify_fails_an_adapter_on_another_base(outputs, tmp_path, capsys):
    other = tmp_path / "other"
    save_sharded(hf_model("llama", seed=1), other, "200KB")
    assert main(["verify", str(outputs / "adapter"), "--base", str(other), "--device", "cpu"]) == 1
    assert "originals" in capsys.readouterr().err.lower()


def test_sha256_digests_are_checked_like_blake3_ones(outputs, tmp_path, capsys):
    """--digest sha256 writes sha256 digests; verify, adapters and unfuse read the manifest's choice."""
    base = outputs / "base"
    adapter, full = tmp_path / "a", tmp_path / "f"
    assert main(["fuse", str(base), "--every", "2", "--adapter-only", "--digest", "sha256", "-o", str(adapter)]) == 0
    fs.fuse(base, full, every=2, digest="sha256")
    doc = json.loads((full / "fusion_manifest.json").read_text())
    assert doc["digest_algorithm"] == "sha256" and doc["digest_scheme"].startswith("sha256")
    ck = Checkpoint.open(full)
    for entry in doc["original_tensors"] + doc["new_tensors"]:
        assert hashlib.sha256(ck.read_bytes(entry["name"])).hexdigest() == entry["digest"]
    fs.load_fused(adapter, base=base)  # the base's sha256 digests match
    assert main(["verify", str(adapter), "--base", str(base), "--device", "cpu"]) == 0
    assert main(["verify", str(full), "--device", "cpu"]) == 0
    fs.unfuse(full, tmp_path / "u")
    assert not fs.unfuse(full, tmp_path / "u2").modified
    capsys.readouterr()
    # a manifest without the field predates it: its digests are sha256
    del doc["digest_algorithm"]
    (full / "fusion_manifest.json").write_text(json.dumps(doc))
    assert main(["verify", str(full), "--device", "cpu"]) == 0
    doc["digest_algorithm"] = "md5"
    (full / "fusion_manifest.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["verify", str(full), "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "'md5'" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert main(["fuse", str(base), "--every", "2", "--digest", "md5", "-o", str(tmp_path / "x")]) == 2
    assert "--digest" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_verify_reads_a_file_shared_with_the_base_once(outputs, monkeypatch):
    """An adapter's base and a --link output's shards are the base's own files: digested once, not twice."""
    from fusionsurgery.verification import originals

    real, calls = originals.tensor_digests, []

    def counting(path, *args, **kwargs):
        calls.append(os.stat(path).st_ino)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(originals, "tensor_digests", counting)
    base = outputs / "base"
    for out in (outputs / "adapter", outputs / "link"):
        calls.clear()
        assert main(["verify", str(out), "--base", str(base), "--device", "cpu"]) == 0
        assert len(calls) == len(set(calls)) > 0, calls
