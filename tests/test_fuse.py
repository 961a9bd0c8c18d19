"""The fuse command and API: inputs, options, outputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
import torch
from safetensors.torch import load_file, save_file

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import hf_model, make_base, read_json, save_sharded

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny-llama"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"), "llama")[0]


def test_cli_fuses_the_example_with_default_output(tmp_path, capsys):
    base = tmp_path / "tiny-llama"
    shutil.copytree(EXAMPLE, base)
    assert main(["fuse", str(base), "--every", "4"]) == 0
    out = tmp_path / "tiny-llama-fused"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "fusion-00001-of-00001.safetensors", "fusion_manifest.json", "generation_config.json",
        "model.safetensors", "model.safetensors.index.json"]
    report = capsys.readouterr().out
    assert "Fused layers" in report and "generation_config.json" in report
    cfg = read_json(out / "config.json")
    assert cfg["fusion"]["layers"] == [3, 7] and cfg["fusion"]["fusion_first"] is True
    assert cfg["rope_scaling"]["rope_type"] == "llama3"  # the base's config is kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary debris


def test_json_summary(tmp_path, llama, capsys):
    assert main(["fuse", str(llama), "--layers", "0,-1", "-o", str(tmp_path / "o"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fused_layers"] == [0, 3]
    assert doc["fusion_params"] == sum(doc["params_per_layer"].values())
    assert 0 < doc["fusion_percent_of_base"] < 100


def test_manifest_is_complete(tmp_path, llama):
    out = tmp_path / "o"
    result = fs.fuse(llama, out, every=2, seed=3)
    m = read_json(out / "fusion_manifest.json")
    assert m["tool"]["name"] == "fusionsurgery" and m["tool"]["version"] == fs.__version__
    assert m["digest_algorithm"] == "blake3"
    assert m["fusion"]["layers"] == [1, 3] and m["fusion"]["seed"] == 3
    base = Checkpoint.open(llama)
    originals = {t["name"]: t for t in m["original_tensors"]}
    assert originals.keys() == set(base.keys())
    for key, entry in originals.items():
        assert entry["digest"] == blake3.blake3(base.read_bytes(key)).hexdigest()
    fused = Checkpoint.open(out)
    for entry in m["new_tensors"]:
        assert entry["trainable"] is True and entry["numel"] > 0
        assert entry["digest"] == blake3.blake3(fused.read_bytes(entry["name"])).hexdigest()
    assert m["totals"]["fusion_params"] == result.fusion_params == sum(t["numel"] for t in m["new_tensors"])
    assert m["totals"]["base_params"] == sum(base.info(k).numel for k in base.keys())
    assert m["base"]["files"][0]["name"] == "model.safetensors"
    index = read_json(out / "model.safetensors.index.json")
    assert set(index["weight_map"]) == set(fused.keys())


def test_sharded_base_keeps_its_shard_files(tmp_path):
    model = hf_model("llama")
    base = tmp_path / "sharded"
    shards = save_sharded(model, base)
    out = tmp_path / "o"
    fs.fuse(base, out, every=2)
    for name in shards:
        assert sha(out / name) == sha(base / name)
    base_index = read_json(base / "model.safetensors.index.json")["weight_map"]
    out_index = read_json(out / "model.safetensors.index.json")["weight_map"]
    assert {k: v for k, v in out_index.items() if k in base_index} == base_index
    model_out = fs.load_fused(out, dtype=torch.float32)
    t = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model_out(t), model(t).logits, atol=1e-4)


def test_single_file_input_and_torchtune_names(tmp_path):
    sd = hf_model("llama").state_dict()
    from fusionsurgery.arch.families import FAMILIES

    tune = {FAMILIES["hf"].to_canonical(k): v.contiguous() for k, v in sd.items()}
    save_file(tune, str(tmp_path / "tune.safetensors"))
    out = tmp_path / "tune-fused"
    result = fs.fuse(tmp_path / "tune.safetensors", out, every=2, num_heads=4)
    assert result.config.family == "torchtune"
    assert "num_heads" in result.config.inferred
    keys = set(Checkpoint.open(out).keys())
    assert "layers.1.fusion_layer.attn.q_proj.weight" in keys
    assert "layers.1.fusion_layer.ca_scale.scale" in keys and "layers.1.fusion_layer.attn.q_norm.scale" in keys
    assert (out / "tune.safetensors").exists()


def test_no_config_requires_num_heads(tmp_path, capsys):
    sd = load_file(str(EXAMPLE / "model.safetensors"))
    save_file(sd, str(tmp_path / "bare.safetensors"))
    assert main(["fuse", str(tmp_path / "bare.safetensors"), "--every", "4", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--num-heads" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["fuse", str(tmp_path / "bare.safetensors"), "--every", "4", "-o", str(tmp_path / "o"),
                 "--num-heads", "4"]) == 0
    cfg = read_json(tmp_path / "o" / "config.json")
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 32 and "rope_theta" not in cfg


def test_qwen3_head_dim_is_inferred_from_qk_norms(tmp_path):
    base, _ = make_base(tmp_path, "qwen3")
    (base / "config.json").unlink()
    result = fs.fuse(base, tmp_path / "o", every=4)
    assert (result.config.head_dim, result.config.num_heads, result.config.num_kv_heads) == (24, 4, 2)


@pytest.mark.parametrize("init", ["normal", "xavier", "copy"])
def test_init_choices(tmp_path, llama, init):
    out = tmp_path / init
    fs.fuse(llama, out, layers="1", init=init, init_std=0.05)
    ck = Checkpoint.open(out)
    q = ck.read_tensor("model.layers.1.fusion_layer.cross_attn.q_proj.weight").float()
    w2 = ck.read_tensor("model.layers.1.fusion_layer.mlp.down_proj.weight").float()
    if init == "copy":
        assert torch.equal(q, ck.read_tensor("model.layers.1.self_attn.q_proj.weight").float())
        assert torch.equal(w2, ck.read_tensor("model.layers.1.mlp.down_proj.weight").float())
    elif init == "normal":
        assert abs(q.std().item() - 0.05) < 0.01
    else:
        bound = (6.0 / sum(q.shape)) ** 0.5
        assert q.abs().max() <= bound and q.abs().max() > 0.8 * bound
    assert torch.count_nonzero(ck.read_tensor("model.layers.1.fusion_layer.cross_attn_mlp_gate")) == 0


def test_init_copy_needs_matching_encoder_width(tmp_path, llama, capsys):
    assert main(["fuse", str(llama), "--every", "2", "--init", "copy", "--encoder-dim", "32",
                 "-o", str(tmp_path / "o")]) == 2
    assert "--init copy" in capsys.readouterr().err


def test_options_encoder_dim_fusion_vocab_dtype_after(tmp_path, llama):
    out = tmp_path / "o"
    fs.fuse(llama, out, every=4, encoder_dim=40, fusion_vocab=5, dtype="bf16", fusion_after=True)
    ck = Checkpoint.open(out)
    assert ck.info("model.layers.3.fusion_layer.cross_attn.k_proj.weight").shape == (32, 40)
    assert ck.info("model.embed_tokens.fusion_embedding.weight").shape == (5, 64)
    assert ck.info("model.layers.3.fusion_layer.cross_attn.q_proj.weight").dtype == "BF16"
    assert ck.info("model.layers.0.self_attn.q_proj.weight").dtype == "F32"
    model = fs.load_fused(out, dtype=torch.float32)
    assert model.layers[3].fusion_first is False
    t = torch.tensor([[1, 2, 130, 132]])  # ids past the vocab use the fusion embedding
    with torch.no_grad():
        assert model(t, encoder_input=torch.randn(1, 3, 40)).shape == (1, 4, 128)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, llama):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        fs.fuse(llama, tmp_path / name, every=2, seed=seed)
    fusion = "fusion-00001-of-00001.safetensors"
    assert sha(tmp_path / "a" / fusion) == sha(tmp_path / "b" / fusion)
    assert sha(tmp_path / "a" / fusion) != sha(tmp_path / "c" / fusion)


def test_same_bytes_whatever_the_cpu_kernels(tmp_path, llama):
    """The new weights do not depend on which SIMD kernels this CPU (or torch) picks."""
    fusion = "fusion-00001-of-00001.safetensors"
    digests = set()
    for cap in ("default", "avx2"):
        out = tmp_path / cap
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        subprocess.run([sys.executable, "-m", "fusionsurgery", "fuse", str(llama), "--every", "2", "--init-std", "0.05",
                        "-o", str(out), "--json"], check=True, env=env, capture_output=True)
        digests.add(sha(out / fusion))
    assert len(digests) == 1


def test_base_state_dict_loads_into_load_fused_model(tmp_path, llama):
    fs.fuse(llama, tmp_path / "o", every=2)
    model = fs.load_fused(tmp_path / "o", dtype=torch.float32)
    base_sd = load_file(str(llama / "model.safetensors"))
    result = model.load_state_dict(base_sd, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".fusion_layer." in k for k in result.missing_keys)
    assert set(model.state_dict()) == set(Checkpoint.open(tmp_path / "o").keys())


def test_refuses_existing_output_without_force(tmp_path, llama, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["fuse", str(llama), "--every", "2", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["fuse", str(llama), "--every", "2", "-o", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "fusion_manifest.json").exists()


def test_refuses_an_already_fused_input(tmp_path, llama, capsys):
    fs.fuse(llama, tmp_path / "o", every=2)
    assert main(["fuse", str(tmp_path / "o"), "--every", "2", "-o", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "already a fused checkpoint" in err and "[1, 3]" in err and "unfuse" in err


def test_rope_defaults_for_a_torchtune_base_without_config(tmp_path, capsys):
    from fusionsurgery.arch.families import FAMILIES

    sd = hf_model("llama").state_dict()
    save_file({FAMILIES["hf"].to_canonical(k): v.contiguous() for k, v in sd.items()}, str(tmp_path / "t.safetensors"))
    plain, assumed = tmp_path / "plain", tmp_path / "assumed"
    fs.fuse(tmp_path / "t.safetensors", plain, every=2, num_heads=4)
    fs.fuse(tmp_path / "t.safetensors", assumed, every=2, num_heads=4, rope_defaults="llama3")
    assert read_json(assumed / "config.json")["rope_theta"] == 500000.0
    fs.load_fused(assumed)  # RoPE known: no flag needed any more
    assert main(["verify", str(plain), "--device", "cpu"]) == 2
    assert "--rope-defaults" in capsys.readouterr().err
    assert main(["verify", str(plain), "--device", "cpu", "--rope-defaults", "llama3"]) == 0
    assert main(["fuse", str(tmp_path / "t.safetensors"), "--every", "2", "--num-heads", "4", "-o",
                 str(tmp_path / "x"), "--rope-defaults", "llama2"]) == 2


def test_new_tensors_are_grouped_into_shards_in_order():
    from fusionsurgery.io.writer import group_into_shards
    from fusionsurgery.surgery.plan import NewTensor

    sizes = [3, 4, 2, 9, 1, 1]  # bf16 rows of 1 element: nbytes = 2 * size
    tensors = [NewTensor(f"t{i}", f"t{i}", (n,), "BF16", "zeros") for i, n in enumerate(sizes)]
    groups = group_into_shards(tensors, max_bytes=10)
    assert [[t.key for t in g] for g in groups] == [["t0"], ["t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [t for g in group_into_shards(tensors, 10**9) for t in g] == tensors
