"""Hostile files, bad flags, full disks, signals and races: a clean one-line error, nothing left behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest
from safetensors.torch import load_file, save_file

from fusionsurgery.cli import main
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import assert_clean_failure, make_base, run_cli, tree_digest

EXAMPLE = Path(__file__).parent.parent / "examples" / "tiny-llama"
CLI = [sys.executable, "-m", "fusionsurgery"]


def raw_safetensors(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


@pytest.fixture()
def llama(tmp_path) -> Path:
    return make_base(tmp_path, "llama")[0]


# ---------------------------------------------------------------- hostile files
T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
CASES = {
    "random bytes": lambda p: p.write_bytes(os.urandom(4096)) and p,
    "too short": lambda p: p.write_bytes(b"\x01\x02") and p,
    "truncated data": lambda p: raw_safetensors(p, {"w": T}, b"\x00" * 8),
    "absurd header length": lambda p: raw_safetensors(p, b"{}", length=2**62),
    "header past end": lambda p: raw_safetensors(p, b"{}", length=1000),
    "header not json": lambda p: raw_safetensors(p, b"{not json at all"),
    "header not an object": lambda p: raw_safetensors(p, [1, 2, 3]),
    "unknown dtype": lambda p: raw_safetensors(p, {"w": dict(T, dtype="F128")}, b"\x00" * 16),
    "dtype not a string": lambda p: raw_safetensors(p, {"w": dict(T, dtype=["F32"])}, b"\x00" * 16),
    "overlapping offsets": lambda p: raw_safetensors(
        p, {"a": T, "b": dict(T, data_offsets=[8, 24])}, b"\x00" * 24),
    "gap in offsets": lambda p: raw_safetensors(p, {"a": dict(T, data_offsets=[16, 32])}, b"\x00" * 32),
    "offsets past end": lambda p: raw_safetensors(p, {"a": dict(T, data_offsets=[0, 16])}, b"\x00" * 4),
    "shape disagrees with bytes": lambda p: raw_safetensors(p, {"a": dict(T, shape=[3, 3])}, b"\x00" * 16),
    "negative shape": lambda p: raw_safetensors(p, {"a": dict(T, shape=[-2, -8])}, b"\x00" * 16),
    "duplicate keys": lambda p: raw_safetensors(
        p, b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        b"\x00" * 16),
    "bad metadata": lambda p: raw_safetensors(p, {"__metadata__": {"k": 1}, "a": T}, b"\x00" * 16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_safetensors_files(tmp_path, capsys, case):
    path = CASES[case](tmp_path / "model.safetensors")
    before = tree_digest(path)
    code, err = run_cli(["fuse", str(path), "--every", "1"], capsys)
    assert_clean_failure(code, err, tmp_path)
    assert tree_digest(path) == before


def test_file_not_found(tmp_path, capsys):
    code, err = run_cli(["fuse", str(tmp_path / "nope.safetensors"), "--every", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, contains="no such file")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_pickle_checkpoints_are_refused_without_loading(tmp_path, capsys, suffix):
    marker = tmp_path / "pwned"
    # a pickle that would create a file if it were ever unpickled
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (tmp_path / f"pytorch_model{suffix}").write_bytes(payload)
    for target in (tmp_path / f"pytorch_model{suffix}", tmp_path):
        code, err = run_cli(["fuse", str(target), "--every", "2", "-o", str(tmp_path / "out")], capsys)
        assert code == 2 and "safetensors" in err and "pickle" in err
    assert not marker.exists()


# ---------------------------------------------------------------- sharded directories
@pytest.fixture()
def sharded(tmp_path) -> Path:
    from helpers import hf_model, save_sharded

    base = tmp_path / "sharded"
    save_sharded(hf_model("llama"), base)
    return base


def _edit_index(base: Path, fn) -> None:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    fn(index["weight_map"])
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


def _first_shard(base: Path) -> str:
    return sorted(p.name for p in base.glob("model-*.safetensors"))[0]


@pytest.mark.parametrize("case,contains", [
    ("missing shard", "missing"),
    ("dotdot", "escapes"),
    ("absolute", "escapes"),
    ("subdirectory", "escapes"),
    ("key not in shard", "not in its shard"),
    ("shard key missing from index", "missing from"),
    ("key in two shards", "in both"),
])
def test_hostile_sharded_directories(tmp_path, sharded, capsys, case, contains):
    first = _first_shard(sharded)
    if case == "missing shard":
        (sharded / first).unlink()
    elif case == "dotdot":
        _edit_index(sharded, lambda wm: wm.update({k: "../" + first for k, v in wm.items() if v == first}))
    elif case == "absolute":
        _edit_index(sharded, lambda wm: wm.update({k: str(sharded / first) for k, v in wm.items() if v == first}))
    elif case == "subdirectory":  # even a real file: a name from inside a download stays a plain name
        (sharded / "sub").mkdir()
        (sharded / first).rename(sharded / "sub" / first)
        _edit_index(sharded, lambda wm: wm.update({k: "sub/" + first for k, v in wm.items() if v == first}))
    elif case == "key not in shard":
        _edit_index(sharded, lambda wm: wm.update({"model.layers.99.mlp.up_proj.weight": first}))
    elif case == "shard key missing from index":
        key = next(k for k, v in json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].items()
                   if v == first)
        _edit_index(sharded, lambda wm: wm.pop(key))
    elif case == "key in two shards":
        second = sorted(p.name for p in sharded.glob("model-*.safetensors"))[1]
        tensors = load_file(str(sharded / second))
        extra_key = next(k for k, v in json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].items()
                         if v == first)
        tensors[extra_key] = load_file(str(sharded / first))[extra_key]
        save_file(tensors, str(sharded / second))
    before = {k: v for k, v in tree_digest(sharded).items()}
    code, err = run_cli(["fuse", str(sharded), "--every", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, contains=contains)
    assert tree_digest(sharded) == before


def test_hf_cache_snapshot_symlinks_are_allowed(tmp_path, capsys):
    """A Hugging Face cache snapshot links its files to ../../blobs: that is not an escape."""
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in EXAMPLE.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    code, err = run_cli(["fuse", str(snap), "--every", "4", "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("flags,contains", [
    (["--every", "0"], "--every"),
    (["--every", "-3"], "--every"),
    (["--every", "99"], "selects no layer"),
    (["--layers", ""], "empty"),
    (["--layers", "a,b"], "not an integer"),
    (["--layers", "1,x"], "not an integer"),
    (["--layers", "4"], "out of range"),
    (["--layers", "-5"], "out of range"),
    (["--layers", "1,1"], "twice"),
    (["--layers", "1:3,2"], "twice"),
    (["--layers", "::0"], "step 0"),
    (["--layers", "1:2:3:4"], "slice"),
    (["--layers", "3:1"], "selects no layer"),
    (["--every", "2", "--layers", "1"], "exactly one"),
    ([], "exactly one"),
    (["--every", "2", "--encoder-dim", "0"], "--encoder-dim"),
    (["--every", "2", "--encoder-dim", "-4"], "--encoder-dim"),
    (["--every", "2", "--fusion-vocab", "-1"], "--fusion-vocab"),
    (["--every", "2", "--init", "copy", "--encoder-dim", "32"], "--init copy"),
    (["--every", "2", "--init", "orthogonal"], "--init"),
    (["--every", "2", "--init-std", "0"], "--init-std"),
    (["--every", "2", "--dtype", "int8"], "--dtype"),
    (["--every", "two"], "--every"),
    (["--every", "2", "--bogus"], "bogus"),
])
def test_bad_flags(tmp_path, llama, capsys, flags, contains):
    before = tree_digest(llama)
    code, err = run_cli(["fuse", str(llama), *flags], capsys)
    assert_clean_failure(code, err, tmp_path, contains=contains)
    assert tree_digest(llama) == before


# ---------------------------------------------------------------- outputs
def test_existing_output_is_untouched_without_force(tmp_path, llama, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("keep")
    code, err = run_cli(["fuse", str(llama), "--every", "2", "-o", str(out)], capsys)
    assert code == 2 and "--force" in err and (out / "precious").read_text() == "keep"


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_equal_to_inside_or_containing_the_input(tmp_path, llama, capsys, where):
    out = {"same": llama, "inside": llama / "sub", "contains": tmp_path}[where]
    before = tree_digest(llama)
    code, err = run_cli(["fuse", str(llama), "--every", "2", "-o", str(out), "--force"], capsys)
    assert code == 2 and "choose another -o" in err
    assert tree_digest(llama) == before


def test_already_fused_input_is_refused(tmp_path, llama, capsys):
    assert main(["fuse", str(llama), "--layers", "0,2", "-o", str(tmp_path / "f")]) == 0
    capsys.readouterr()
    code, err = run_cli(["fuse", str(tmp_path / "f"), "--every", "2", "-o", str(tmp_path / "g")], capsys)
    assert code == 2 and "[0, 2]" in err and "unfuse" in err and not (tmp_path / "g").exists()


# ---------------------------------------------------------------- faults
def _big_base(tmp_path: Path) -> Path:
    """A base large enough (~60 MB) that a run can be interrupted mid-write."""
    return make_base(tmp_path, "llama", hidden_size=512, intermediate_size=1536, vocab_size=8192,
                     num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)[0]


def test_disk_full_mid_write_leaves_nothing(tmp_path, llama):
    import resource

    def limit():  # a file-size limit: writes past 200 kB fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    before = tree_digest(llama)
    proc = subprocess.run([*CLI, "fuse", str(llama), "--every", "1", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "disk" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert tree_digest(llama) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_leaves_nothing(tmp_path, sig):
    base = _big_base(tmp_path)
    before = tree_digest(base)
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "fuse", str(base), "--every", "1", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.tmp-*/*")):
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert tree_digest(base) == before


def test_killed_run_debris_is_cleaned_by_the_next_run(tmp_path, llama):
    proc = subprocess.run([sys.executable, "-c", "pass"])
    stale = tmp_path / f".out.tmp-{999999}-deadbeef"  # a pid that does not exist
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert proc.returncode == 0
    assert main(["fuse", str(llama), "--every", "2", "-o", str(tmp_path / "out")]) == 0
    assert not stale.exists()


def test_two_runs_on_the_same_output(tmp_path):
    base = _big_base(tmp_path)
    out = tmp_path / "out"
    procs = [subprocess.Popen([*CLI, "fuse", str(base), "--every", "2", "-o", str(out), "--seed", str(s)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] in (1, 2), results
    loser = next(err for code, err in results if code != 0)
    assert "already exists" in loser or "appeared while writing" in loser
    # the winner's output is whole: every digest in its manifest matches the files
    manifest = json.loads((out / "fusion_manifest.json").read_text())
    ck = Checkpoint.open(out)
    for entry in manifest["original_tensors"] + manifest["new_tensors"]:
        assert blake3.blake3(ck.read_bytes(entry["name"])).hexdigest() == entry["digest"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_base_modified_while_read_manifest_digests_what_was_written(tmp_path, llama, monkeypatch):
    """If the base changes between opening and copying, digests describe the bytes written."""
    from fusionsurgery.surgery import fuse as fuse_mod

    real_copy = fuse_mod.copy_and_digest

    def tampering_copy(src, dst, header, progress=None, cancel=None, algorithm="blake3"):
        data = bytearray(src.read_bytes())
        data[-1] ^= 0xFF  # someone rewrites the last byte of the base mid-run
        src.write_bytes(bytes(data))
        return real_copy(src, dst, header, progress, cancel, algorithm)

    monkeypatch.setattr(fuse_mod, "copy_and_digest", tampering_copy)
    fuse_mod.fuse(llama, tmp_path / "out", every=2)
    manifest = json.loads((tmp_path / "out" / "fusion_manifest.json").read_text())
    ck = Checkpoint.open(tmp_path / "out")
    for entry in manifest["original_tensors"]:
        assert blake3.blake3(ck.read_bytes(entry["name"])).hexdigest() == entry["digest"]


def test_bad_config_values_are_one_line_errors(tmp_path, llama, capsys):
    cfg = json.loads((llama / "config.json").read_text())
    # (a model_type other than the six native ones is read as any decoder since issue 20: "" stays bad)
    for bad in ({"num_attention_heads": "many"}, {"model_type": ["llama"]}, {"model_type": ""},
                {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
                {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
                {"hidden_size": 65}):
        (llama / "config.json").write_text(json.dumps({**cfg, **bad}))
        code, err = run_cli(["fuse", str(llama), "--every", "2"], capsys)
        assert_clean_failure(code, err, tmp_path)
    (llama / "config.json").write_text("{broken")
    code, err = run_cli(["fuse", str(llama), "--every", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, contains="config")
