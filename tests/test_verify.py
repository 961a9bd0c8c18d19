"""``verify``: every check passes on a sound fused checkpoint and fails on a broken one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusionsurgery.cli import main
from fusionsurgery.errors import CheckpointError, UsageError
from fusionsurgery.io.checkpoint import INDEX_NAME, MANIFEST_NAME, Checkpoint
from fusionsurgery.surgery.fuse import fuse
from fusionsurgery.verification import verify
from fusionsurgery.verification import memory
from helpers import make_base

CHECKS = ["structure", "originals", "identity", "live", "backward", "kv_cache", "figures"]
MODEL_CHECKS = CHECKS[2:]
O_PROJ = "model.layers.1.fusion_layer.cross_attn.o_proj.weight"
K_PROJ = "model.layers.3.fusion_layer.cross_attn.k_proj.weight"
GATE = "model.layers.3.fusion_layer.cross_attn_attn_gate"
ORIGINAL = "model.layers.2.self_attn.v_proj.weight"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------- fixtures and breakers
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path, _ = make_base(tmp_path_factory.mktemp("verify"), "llama")
    return path


@pytest.fixture(scope="module")
def fused(base: Path) -> Path:
    out = base.parent / "fused"
    fuse(base, out, every=2, fusion_vocab=3)  # layers 1 and 3
    return out


@pytest.fixture
def broken(fused: Path, tmp_path: Path) -> Path:
    """A private copy of the fused checkpoint to break."""
    return Path(shutil.copytree(fused, tmp_path / "broken"))


def shard_of(path: Path, key: str) -> str:
    return Checkpoint.open(path).key_to_file[key]


def rewrite(path: Path, key: str, edit) -> None:
    """Rewrite the shard holding ``key`` with ``edit(tensors)`` applied, and re-index it."""
    name = shard_of(path, key)
    tensors = load_file(str(path / name))
    edit(tensors)
    save_file(tensors, str(path / name), metadata={"format": "pt"})
    index = json.loads((path / INDEX_NAME).read_text())
    wm = {k: f for k, f in index["weight_map"].items() if f != name}
    wm.update({k: name for k in tensors})
    index["weight_map"] = wm
    (path / INDEX_NAME).write_text(json.dumps(index))
    ckpt = Checkpoint.open(path)
    index["metadata"]["total_size"] = sum(ckpt.info(k).nbytes for k in wm)
    (path / INDEX_NAME).write_text(json.dumps(index))


def edit_manifest(path: Path, edit) -> None:
    doc = json.loads((path / MANIFEST_NAME).read_text())
    edit(doc)
    (path / MANIFEST_NAME).write_text(json.dumps(doc))


def flip_byte(path: Path, key: str) -> None:
    ckpt = Checkpoint.open(path)
    info = ckpt.info(key)
    file = ckpt.path_of(ckpt.key_to_file[key])
    data = bytearray(file.read_bytes())
    data[info.start + info.nbytes // 2] ^= 0x01
    file.write_bytes(bytes(data))


def statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def details(report, name: str) -> str:
    return " | ".join(report.check(name).details)


# ---------------------------------------------------------------- a sound checkpoint
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_sound_checkpoint_passes_every_check(fused: Path, base: Path, stream: bool) -> None:
    report = verify(fused, base, device="cpu", stream=stream)
    assert statuses(report) == dict.fromkeys(CHECKS, "passed"), report.to_dict()
    assert report.ok and not report.failures
    identity = report.check("identity").figures
    assert identity["max_abs_diff_with_encoder"] == 0.0 and identity["trained_gates"] == []
    assert set(identity["gates"]) == {"1", "3"}
    assert report.check("originals").figures["against"] == ["manifest digests", "--base"]
    assert report.check("backward").figures["base_params_with_grad"] == 0
    assert report.check("backward").figures["fusion_params_with_grad"] == 27  # 2 x 13 + fusion embedding
    figures = report.check("figures").figures
    assert figures["forward_tokens_per_s"] > 0 and figures["peak_memory_bytes"] > 0
    assert figures["device"] == "cpu" and figures["dtype"] == "float32"
    assert report.settings["memory"]["estimate"]["stream"] is stream
    json.dumps(report.to_dict())


def test_streamed_engine_computes_what_the_plain_engine_computes(fused: Path) -> None:
    from fusionsurgery.verification import plain, structure
    from fusionsurgery.verification.probe import make_probe
    from fusionsurgery.verification.stream import LayerStream, run_stream

    ckpt = Checkpoint.open(fused)
    _, layout = structure.check_structure(ckpt)
    dev, dt = torch.device("cpu"), torch.float32
    probe = make_probe(layout.cfg, layout.fusion, dev, dt)
    base_model = plain.load_base(ckpt, layout.cfg, layout.original_keys, dev, dt)
    a = plain.run_plain(plain.load_fused_model(ckpt, layout.cfg, layout.fusion, dev, dt),
                        plain.base_logits(base_model, probe), probe, bench_len=8)
    stream = LayerStream(ckpt, layout.cfg, layout.fusion, dev, dt, head_chunk_bytes=1000)  # many head chunks
    b = run_stream(stream, probe)
    for name in ("base", "text", "enc", "open_a", "open_b", "decode", "after_reset"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5, msg=name)
    assert a.gates == b.gates and a.gates_restored and b.gates_restored
    assert a.grads == b.grads and len(a.grads) == 27
    assert a.base_params_with_grad == b.base_params_with_grad == []
    assert a.reset_problems == b.reset_problems == []
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    assert a.layer_sensitivity.keys() == b.layer_sensitivity.keys()
    for i in a.layer_sensitivity:
        assert b.layer_sensitivity[i] == pytest.approx(a.layer_sensitivity[i], rel=1e-3)
    assert b.figures["resident_weight_bytes"] < a.figures["resident_weight_bytes"] / 2


def test_streamed_and_plain_reports_agree_on_a_broken_checkpoint(broken: Path) -> None:
    rewrite(broken, O_PROJ, lambda t: t[O_PROJ].zero_())
    plain_report = verify(broken, device="cpu")
    stream_report = verify(broken, device="cpu", stream=True)
    assert statuses(plain_report) == statuses(stream_report)
    assert plain_report.check("live").failed and stream_report.check("live").failed
    assert plain_report.check("identity").figures["max_abs_diff_text_only"] == 0.0
    assert stream_report.check("identity").figures["max_abs_diff_text_only"] == 0.0


# ---------------------------------------------------------------- 1. structure
def test_missing_fusion_tensor_fails_structure(broken: Path) -> None:
    rewrite(broken, K_PROJ, lambda t: t.pop(K_PROJ))
    report = verify(broken, device="cpu")
    assert report.check("structure").failed
    assert K_PROJ in details(report, "structure") and "missing" in details(report, "structure")
    assert all(report.check(n).status == "skipped" for n in MODEL_CHECKS)
    assert not report.ok


def test_wrong_shape_fails_structure(broken: Path) -> None:
    rewrite(broken, K_PROJ, lambda t: t.__setitem__(K_PROJ, torch.zeros(t[K_PROJ].shape[0], 7)))
    report = verify(broken, device="cpu")
    assert report.check("structure").failed
    assert f"{K_PROJ} is [32, 7] F32, expected [32, 64] F32" in details(report, "structure")


def test_unexplained_extra_tensor_fails_structure(broken: Path) -> None:
    extra = "model.layers.0.fusion_layer.cross_attn_mlp_gate"
    rewrite(broken, GATE, lambda t: t.__setitem__(extra, torch.zeros(1)))
    report = verify(broken, device="cpu")
    assert "unexplained" in details(report, "structure") and extra in details(report, "structure")


def test_inconsistent_index_fails_structure(broken: Path) -> None:
    index = json.loads((broken / INDEX_NAME).read_text())
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][ORIGINAL])
    index["weight_map"][ORIGINAL] = other
    (broken / INDEX_NAME).write_text(json.dumps(index))
    report = verify(broken, device="cpu")
    assert report.check("structure").failed and ORIGINAL in details(report, "structure")
    assert not report.ok


def test_missing_manifest_fails_structure_and_originals_without_base(broken: Path, base: Path) -> None:
    (broken / MANIFEST_NAME).unlink()
    report = verify(broken, device="cpu")
    assert report.check("structure").failed and report.check("originals").failed
    with_base = verify(broken, base, device="cpu")
    assert with_base.check("structure").failed and with_base.check("originals").status == "passed"


@pytest.mark.parametrize("lie", ["shape", "layers", "totals", "new_dtype"])
def test_lying_manifest_fails_structure(broken: Path, lie: str) -> None:
    def edit(doc):
        if lie == "shape":
            doc["original_tensors"][0]["shape"] = [1, 2, 3]
        elif lie == "layers":
            doc["fusion"]["layers"] = [3]
        elif lie == "totals":
            doc["totals"]["fusion_params"] += 1
        else:
            doc["new_tensors"][0]["dtype"] = "BF16"

    edit_manifest(broken, edit)
    report = verify(broken, device="cpu")
    assert report.check("structure").failed, report.to_dict()
    assert "manifest" in details(report, "structure")


# ---------------------------------------------------------------- 2. originals
def test_flipped_byte_in_an_original_tensor_is_named(broken: Path, base: Path) -> None:
    flip_byte(broken, ORIGINAL)
    for ref in (None, base):
        report = verify(broken, ref, device="cpu")
        assert report.check("originals").failed
        assert ORIGINAL in details(report, "originals")
        assert report.check("structure").status == "passed"
    assert "base's bytes" in details(report, "originals")


def test_lying_manifest_digest_fails_originals(broken: Path, base: Path) -> None:
    edit_manifest(broken, lambda doc: doc["original_tensors"][3].__setitem__("digest", "0" * 64))
    name = json.loads((broken / MANIFEST_NAME).read_text())["original_tensors"][3]["name"]
    report = verify(broken, base, device="cpu")
    assert report.check("originals").failed and name in details(report, "originals")
    assert "manifest digests" in details(report, "originals")


def test_base_with_a_different_tensor_fails_originals(broken: Path, base: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(base, tmp_path / "other-base"))
    flip_byte(other, ORIGINAL)
    report = verify(broken, other, device="cpu")
    assert report.check("originals").failed and ORIGINAL in details(report, "originals")


# ---------------------------------------------------------------- 3. identity
def test_trained_gates_are_reported_not_failed(broken: Path) -> None:
    rewrite(broken, GATE, lambda t: t[GATE].fill_(0.5))
    report = verify(broken, device="cpu")
    assert report.ok, report.to_dict()
    identity = report.check("identity")
    assert identity.figures["trained_gates"] == [3]
    assert identity.figures["gates"]["3"]["attn"] == 0.5
    assert identity.figures["max_abs_diff_with_encoder"] > 0
    assert identity.figures["max_abs_diff_text_only"] == 0.0
    assert any("trained gates" in n and "layer 3" in n for n in identity.notes)
    assert any(GATE in n for n in report.check("originals").notes)


def test_non_finite_fusion_weight_fails_identity_and_backward(broken: Path) -> None:
    mlp = "model.layers.3.fusion_layer.mlp.down_proj.weight"
    rewrite(broken, mlp, lambda t: t[mlp].fill_(float("nan")))
    report = verify(broken, device="cpu")
    assert report.check("identity").failed and report.check("backward").failed
    assert "with zero gates and an encoder input the logits differ" in details(report, "identity")
    assert "not finite" in details(report, "backward")


# ---------------------------------------------------------------- 4. live
def test_dead_fusion_layer_fails_liveness_naming_it(broken: Path) -> None:
    rewrite(broken, O_PROJ, lambda t: t[O_PROJ].zero_())
    report = verify(broken, device="cpu")
    live = report.check("live")
    assert live.failed and "fusion layer(s) whose output ignores the encoder input: 1 " in details(report, "live")
    assert live.figures["layer_sensitivity"]["1"] == 0.0 and live.figures["layer_sensitivity"]["3"] > 0.1


# ---------------------------------------------------------------- 5. forward and backward
@pytest.mark.parametrize("engine", ["plain", "stream"])
def test_gradients_reaching_the_base_fail(fused: Path, monkeypatch, engine: str) -> None:
    def unfrozen(model, names):  # "forgets" to freeze the base
        model.requires_grad_(True)

    monkeypatch.setattr(f"fusionsurgery.verification.{engine}.set_trainable_params", unfrozen)
    report = verify(fused, device="cpu", stream=engine == "stream")
    assert report.check("backward").failed
    assert "frozen base parameter(s) got gradients" in details(report, "backward")


# ---------------------------------------------------------------- 6. KV cache
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_reset_that_keeps_the_cache_fails(fused: Path, monkeypatch, stream: bool) -> None:
    from fusionsurgery.modules.attention import KVCache

    monkeypatch.setattr(KVCache, "reset", lambda self: None)
    report = verify(fused, device="cpu", stream=stream)
    assert report.check("kv_cache").failed
    assert "after reset_cache" in details(report, "kv_cache")


def test_corrupt_cached_encoder_states_fail_decoding(fused: Path, monkeypatch) -> None:
    from fusionsurgery.modules.attention import KVCache

    original = KVCache.store
    monkeypatch.setattr(KVCache, "store", lambda self, k, v: original(self, k * 0.5, v * 0.5))
    report = verify(fused, device="cpu")
    assert report.check("kv_cache").failed
    assert "cached decoding differs from the full forward pass" in details(report, "kv_cache")
    assert report.check("identity").status == "passed"


# ---------------------------------------------------------------- memory and devices
def test_memory_estimate_refuses_before_starting(fused: Path) -> None:
    with pytest.raises(UsageError, match="verify needs about .* but only 1 B is available"):
        verify(fused, device="cpu", memory_limit=1)


def test_streaming_fits_where_the_whole_model_does_not(fused: Path) -> None:
    from fusionsurgery.verification import structure

    ckpt = Checkpoint.open(fused)
    _, layout = structure.check_structure(ckpt)
    sizes = dict(batch=2, seq_len=16, encoder_len=8, bench_len=64)
    args = (ckpt, layout.cfg, layout.fusion, layout.original_keys, 4)
    whole, streamed = memory.estimate(*args, stream=False, **sizes), memory.estimate(*args, stream=True, **sizes)
    assert streamed.total < whole.total
    limit = (streamed.total + whole.total) // 2
    with pytest.raises(UsageError, match="`stream` needs"):
        verify(fused, device="cpu", memory_limit=limit)
    assert verify(fused, device="cpu", memory_limit=limit, stream=True).ok


def test_device_auto_picks_cuda_when_present(fused: Path) -> None:
    report = verify(fused, device="auto")
    assert report.settings["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_a_usage_error(fused: Path) -> None:
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        verify(fused, device="cuda")


def test_base_checkpoint_is_not_verifiable(base: Path) -> None:
    with pytest.raises(UsageError, match="not a fused checkpoint"):
        verify(base, device="cpu")


@cuda
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_verification(fused: Path, base: Path, stream: bool, dtype: str) -> None:
    report = verify(fused, base, device="cuda", dtype=dtype, stream=stream)
    assert report.ok, report.to_dict()
    assert report.check("identity").figures["max_abs_diff_with_encoder"] == 0.0
    assert report.check("figures").figures["peak_memory_kind"] == "peak CUDA memory allocated"


# ---------------------------------------------------------------- the CLI
def test_cli_exit_codes_and_json(fused: Path, broken: Path, base: Path, capsys) -> None:
    assert main(["verify", str(fused), "--device", "cpu", "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "Identity at init" in out
    flip_byte(broken, ORIGINAL)
    assert main(["verify", str(broken), "--device", "cpu", "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["ok"] is False and "1 check(s) failed: originals" in captured.err
    assert any(ORIGINAL in d for c in doc["checks"] for d in c["details"])
    assert main(["verify", str(base.parent / "nope"), "--device", "cpu"]) == 2
    assert main(["verify", str(fused), "--device", "cpu", "--memory-limit", "1KiB"]) == 2
    assert main(["verify", str(fused), "--memory-limit", "lots"]) == 2
    assert main(["verify", str(base), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a fused checkpoint" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cli_cuda_without_cuda_exits_2(fused: Path, base: Path, tmp_path: Path, capsys) -> None:
    assert main(["verify", str(fused), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    out = tmp_path / "never"
    assert main(["fuse", str(base), "--every", "2", "-o", str(out), "--verify", "--device", "cuda"]) == 2
    assert not out.exists()


def test_fuse_verify_runs_the_checks(base: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fused-and-verified"
    assert main(["fuse", str(base), "--every", "2", "-o", str(out), "--verify", "--device", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fused_layers"] == [1, 3] and doc["verify"]["ok"] is True
    assert [c["name"] for c in doc["verify"]["checks"]] == CHECKS
    assert doc["verify"]["base"] == str(base)
