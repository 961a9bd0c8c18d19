"""Every command under faults: damaged inputs (command x fault), killed runs, bad flags, symlinked shards.

Each command that reads a fused checkpoint (verify, export, unfuse, inspect, load_fused) meets the
same damaged copies of one tiny fused checkpoint and must give a one-line error (exit 2), a failed
check (exit 1) or a note that names the damaged tensor, never a traceback, and leave no output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.errors import FusionSurgeryError
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import assert_clean_failure, error_lines, make_base, run_cli, tree_digest

ORIGINAL = "model.layers.1.mlp.up_proj.weight"
PERMUTED = "model.layers.3.self_attn.q_proj.weight"  # rows permuted by --to torchtune: hashed as read
FUSION = "model.layers.2.fusion_layer.mlp.up_proj.weight"
FUSION_SHARD = "fusion-00001-of-00001.safetensors"

#: Runs the CLI with ``<module>.<function>`` replaced by one that sends the process a signal on its n-th call.
KILLER = """
import importlib, os, signal, sys
from fusionsurgery.cli import main
module, name = sys.argv[1].rsplit(".", 1)
n, sig, owner = int(sys.argv[2]), getattr(signal, sys.argv[3]), importlib.import_module(module)
real, calls = getattr(owner, name), [0]
def deadly(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), sig)
    return real(*args, **kwargs)
setattr(owner, name, deadly)
sys.exit(main(sys.argv[4:]))
"""


def killed(where: str, n: int, args: list[str], sig: str = "SIGKILL") -> subprocess.CompletedProcess:
    """Run ``fusionsurgery args`` and send it ``sig`` at the ``n``-th call of ``where`` (e.g. ``os.fsync``)."""
    return subprocess.run([sys.executable, "-c", KILLER, where, str(n), sig, *args], capture_output=True, text=True,
                          timeout=120)


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """(base, fused): a tiny Llama and its fusion at layers 0 and 2 (originals and fusion tensors in separate shards)."""
    root = tmp_path_factory.mktemp("faults")
    base = make_base(root, "llama")[0]
    assert fs.fuse(base, root / "fused", layers="0,2").output.exists()
    return base, root / "fused"


@pytest.fixture(scope="module")
def debris(made, tmp_path_factory) -> Path:
    """What a fuse killed while writing its index leaves: whole shards, an empty index, no config."""
    base, _ = made
    root = tmp_path_factory.mktemp("debris")
    proc = killed("json.dump", 1, ["fuse", str(base), "--every", "2", "-o", str(root / "out")])
    assert proc.returncode == -9, proc.stderr
    assert not (root / "out").exists()
    (left,) = [root / name for name in hidden(root)]
    return left


# ---------------------------------------------------------------- damaged inputs: command x fault
def _flip(d: Path, key: str) -> None:
    ck = Checkpoint.open(d)
    path, info = ck.path_of(ck.key_to_file[key]), ck.info(key)
    data = bytearray(path.read_bytes())
    data[info.start + 1] ^= 0x01  # one low mantissa bit: the value stays finite and plausible
    path.write_bytes(bytes(data))


def _cut(path: Path, n: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:-n])


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


FAULTS = {
    "original shard cut short": lambda d: _cut(d / "model.safetensors"),
    "fusion shard cut short": lambda d: _cut(d / FUSION_SHARD),
    "flipped bit in an original": lambda d: _flip(d, ORIGINAL),
    "flipped bit in a fusion tensor": lambda d: _flip(d, FUSION),
    "flipped bit in a permuted original": lambda d: _flip(d, PERMUTED),
    "fusion section names other layers": lambda d: _edit(d / "config.json", lambda c: c["fusion"].update(layers=[0, 1])),
    "fusion section with another encoder width": lambda d: _edit(d / "config.json",
                                                                 lambda c: c["fusion"].update(encoder_dim=32)),
    "fusion section of the wrong type": lambda d: _edit(d / "config.json", lambda c: c["fusion"].update(seed="zero")),
    "deeply nested manifest": lambda d: (d / "fusion_manifest.json").write_text("[" * 100_000 + "]" * 100_000),
    "deeply nested index": lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map":' + "{" * 100_000),
    "manifest that is a device": lambda d: ((d / "fusion_manifest.json").unlink(),
                                            (d / "fusion_manifest.json").symlink_to("/dev/zero")),
    "hostile manifest": lambda d: _edit(d / "fusion_manifest.json",
                                        lambda m: m["original_tensors"].insert(0, {"name": ["x"], "shape": 3})),
    "manifest of the wrong shape": lambda d: _edit(d / "fusion_manifest.json", lambda m: m.update(base=[1, 2])),
    "index naming a shard outside": lambda d: _edit(d / "model.safetensors.index.json",
                                                    lambda i: i["weight_map"].update({FUSION: "../x.safetensors"})),
}
COMMANDS = ("verify", "export", "unfuse", "inspect", "load_fused")

#: What each command must do: ``error`` (exit 2, one line), ``failed`` (exit 1, a failed check),
#: ``note`` (exit 0, a note naming it), ``ok`` (exit 0: the fault is invisible to it by design),
#: each with a text the output must contain. Faults not listed give ``error`` on every command.
EXPECT: dict[str, dict[str, tuple[str, str]]] = {
    "original shard cut short": {c: ("error", "truncated") for c in COMMANDS},
    "fusion shard cut short": {c: ("error", "truncated") for c in COMMANDS},
    "flipped bit in an original": {"verify": ("failed", ORIGINAL), "export": ("note", ORIGINAL),
                                   "unfuse": ("note", ORIGINAL), "inspect": ("ok", ""), "load_fused": ("ok", "")},
    "flipped bit in a permuted original": {"verify": ("failed", PERMUTED), "export": ("note", PERMUTED),
                                           "unfuse": ("note", PERMUTED), "inspect": ("ok", ""),
                                           "load_fused": ("ok", "")},
    "flipped bit in a fusion tensor": {"verify": ("note", FUSION), "export": ("note", FUSION), "unfuse": ("ok", ""),
                                       "inspect": ("ok", ""), "load_fused": ("ok", "")},
    "fusion section names other layers": {"verify": ("failed", "model.layers.1.fusion_layer"),
                                          "inspect": ("note", "model.layers.1.fusion_layer"),
                                          **{c: ("error", "model.layers.1.fusion_layer")
                                             for c in ("export", "unfuse", "load_fused")}},
    "fusion section with another encoder width": {"verify": ("failed", "cross_attn.k_proj.weight"),
                                                  "inspect": ("note", "cross_attn.k_proj.weight"),
                                                  **{c: ("error", "cross_attn.k_proj.weight")
                                                     for c in ("export", "unfuse", "load_fused")}},
    "fusion section of the wrong type": {"verify": ("failed", "fusion.seed"),
                                         **{c: ("error", "fusion.seed") for c in COMMANDS if c != "verify"}},
    "deeply nested manifest": {c: ("error", "manifest is not readable JSON") for c in COMMANDS},
    "deeply nested index": {"verify": ("failed", "index is not readable JSON"),
                            **{c: ("error", "index is not readable JSON") for c in COMMANDS if c != "verify"}},
    "hostile manifest": {c: ("error", "original_tensors[0]") for c in COMMANDS},
    # refused by the link rule (io.links) before it is opened; with --follow-symlinks: "not a regular file"
    "manifest that is a device": {c: ("error", "symlink to /dev/zero") for c in COMMANDS},
    "manifest of the wrong shape": {c: ("error", "'base' is a list") for c in COMMANDS},
    "index naming a shard outside": {"verify": ("failed", "outside the directory"),
                                     **{c: ("error", "escapes") for c in COMMANDS if c != "verify"}},
    "killed fuse's debris": {"verify": ("failed", "index is not readable JSON"),
                             **{c: ("error", "index is not readable JSON") for c in COMMANDS if c != "verify"}},
}


def run_command(command: str, d: Path, out: Path, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``command`` on ``d``; load_fused's errors map to exit 2 like the CLI's."""
    if command == "load_fused":
        try:
            fs.load_fused(d)
        except FusionSurgeryError as exc:
            assert "\n" not in str(exc)
            return 2, "", f"error: {exc}\n"
        return 0, "", ""
    args = {"verify": ["verify", str(d), "--device", "cpu"], "inspect": ["inspect", str(d)],
            "export": ["export", str(d), "--to", "torchtune", "-o", str(out)],
            "unfuse": ["unfuse", str(d), "-o", str(out)]}[command]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault", sorted(EXPECT))
def test_damaged_input(made, debris, tmp_path, capsys, fault, command):
    src = debris if fault == "killed fuse's debris" else made[1]
    d = tmp_path / "in"
    shutil.copytree(src, d)
    if fault in FAULTS:
        FAULTS[fault](d)
    before = tree_digest(d)
    kind, names = EXPECT[fault][command]
    out = tmp_path / "out"
    code, stdout, err = run_command(command, d, out, capsys)
    assert "Traceback" not in err + stdout, err
    stdout = " ".join(stdout.split())  # the report wraps long lines
    assert tree_digest(d) == before  # no command writes into its input
    if kind == "error":
        assert code == 2 and len(error_lines(err)) == 1 and err.strip().splitlines()[-1].startswith("error:"), err
        assert names in err, err
    elif kind == "failed":
        assert code == 1 and names in stdout and "FAILED" in stdout, stdout + err
    else:
        assert code == 0, err
        assert names in stdout, stdout
    if kind in ("error", "failed"):
        assert not out.exists()
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000])
def test_fuse_refuses_deeply_nested_json_in_its_base(made, tmp_path, capsys, name, text):
    base = tmp_path / "base"
    shutil.copytree(made[0], base)
    (base / name).write_text(text)
    code, err = run_cli(["fuse", str(base), "--every", "2"], capsys)
    assert_clean_failure(code, err, tmp_path, contains="not readable JSON")


# ---------------------------------------------------------------- killed runs
def _writer_args(command: str, base: Path, fused: Path, out: Path) -> list[str]:
    return {"fuse": ["fuse", str(base), "--every", "2", "-o", str(out)],
            "export": ["export", str(fused), "--to", "mllama", "-o", str(out)],
            "unfuse": ["unfuse", str(fused), "-o", str(out)]}[command]


def _assert_whole(command: str, out: Path, base: Path) -> None:
    ck = Checkpoint.open(out)
    if command == "unfuse":
        assert tree_digest(out / "model.safetensors").popitem()[1] == tree_digest(base / "model.safetensors").popitem()[1]
    else:
        assert (out / ("fusion_manifest.json" if command == "fuse" else "export_manifest.json")).exists()
        assert ck.config is not None


@pytest.mark.parametrize("command", ["fuse", "export", "unfuse"])
@pytest.mark.parametrize("when", ["mid-write", "before the rename"])
def test_killed_run_leaves_nothing_that_looks_complete(made, tmp_path, command, when):
    """SIGKILL while writing (or with everything written but not yet in place): no output appears,
    and the next run with the same output cleans up and succeeds."""
    base, fused = made
    out = tmp_path / "out"
    where = {"mid-write": "os.fsync", "before the rename": "os.rename"}[when]
    proc = killed(where, 1, _writer_args(command, base, fused, out))
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and hidden(tmp_path), "the killed run left no debris to clean: not killed mid-write?"
    assert main(_writer_args(command, base, fused, out)) == 0
    _assert_whole(command, out, base)
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("command", ["fuse", "export", "unfuse"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_run_cleans_up_after_itself(made, tmp_path, command, sig):
    """Ctrl-C or SIGTERM mid-write: exit 130, one line, and nothing left behind at all."""
    base, fused = made
    proc = killed("os.fsync", 1, _writer_args(command, base, fused, tmp_path / "out"), sig)
    assert proc.returncode == 130, proc.stderr
    assert error_lines(proc.stderr) == ["error: interrupted; nothing was written"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("command", ["fuse", "export", "unfuse"])
def test_killed_between_moving_the_old_output_aside_and_the_new_one_in(made, tmp_path, capsys, command):
    """With --force, a run killed after moving the old output aside: the next run puts it back
    (and refuses to overwrite it without --force), or replaces it with --force."""
    base, fused = made
    out = tmp_path / "out"
    args = _writer_args(command, base, fused, out)
    assert main(args) == 0
    before = tree_digest(out)
    proc = killed("os.rename", 2, [*args, "--force"])
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    code, err = run_cli(args, capsys)
    assert code == 2 and "already exists" in err
    assert {Path(k).name: v for k, v in tree_digest(out).items()} == {Path(k).name: v for k, v in before.items()}
    assert hidden(tmp_path) == []
    proc = killed("os.rename", 2, [*args, "--force"])
    assert proc.returncode == -9
    assert main([*args, "--force"]) == 0
    _assert_whole(command, out, base)
    assert hidden(tmp_path) == []


# ---------------------------------------------------------------- bad flags
BAD_FLAGS = [
    (["verify", "{fused}", "--device", "tpu"], "--device"),
    (["verify", "{fused}", "--device", "cuda:x"], "--device"),
    (["verify", "{fused}", "--dtype", "int8"], "int8"),
    (["verify", "{fused}", "--memory-limit", "lots"], "--memory-limit"),
    (["verify", "{fused}", "--seq-len", "1"], "seq_len"),
    (["verify", "{fused}", "--seq-len", "x"], "--seq-len"),
    (["verify", "{fused}", "--rope-defaults", "llama9"], "--rope-defaults"),
    (["verify", "{fused}", "--bogus"], "--bogus"),
    (["verify"], "Missing argument"),
    (["verify", "{fused}", "--base", "{tmp}/nope"], "no such file"),
    (["export", "{fused}"], "--to"),
    (["export", "{fused}", "--to", "onnx"], "--to"),
    (["export", "{fused}", "--to", "hf", "--rope-defaults", "x"], "--rope-defaults"),
    (["export", "{fused}", "--to", "hf", "--config", "{tmp}/nope.json"], "not found"),
    (["export", "{fused}", "--to", "hf", "--bogus"], "--bogus"),
    (["export", "--to", "hf"], "Missing argument"),
    (["export", "{fused}", "--to", "hf", "-o", "{fused}/inside"], "choose another -o"),
    (["unfuse"], "Missing argument"),
    (["unfuse", "{fused}", "--bogus"], "--bogus"),
    (["unfuse", "{fused}", "-o"], "requires an argument"),
    (["unfuse", "{fused}", "-o", "{fused}"], "choose another -o"),
    (["inspect"], "Missing argument"),
    (["inspect", "{fused}", "--bogus"], "--bogus"),
    (["inspect", "{fused}", "--base"], "requires an argument"),
    (["inspect", "{fused}", "--base", "{tmp}/nope"], "no such file"),
    (["fuse", "{base}", "--every", "2", "--digest", "md5"], "--digest"),
    (["fuse", "{base}", "--every", "2", "--device", "cpu"], "--verify"),
    (["fuse", "{base}", "--every", "2", "--verify", "--device", "tpu"], "--device"),
    (["fuse", "{base}", "--every", "2", "--num-heads", "0"], "--num-heads"),
    (["fuse", "{base}", "--every", "2", "--num-kv-heads", "-2"], "--num-kv-heads"),
    (["fuse", "{base}", "--every", "2", "--init-std", "inf"], "--init-std"),
    (["fuse", "{base}", "--every", "2", "--link", "--adapter-only"], "exclude"),
    (["fuse", "{base}", "--every", "2", "--rope-defaults", "x"], "--rope-defaults"),
    (["fuse", "{base}", "--every", "2", "--config", "{tmp}"], "config"),
    (["transmogrify"], "No such command"),
    (["--bogus"], "--bogus"),
]


@pytest.mark.parametrize("argv,contains", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_on_every_command(made, tmp_path, capsys, argv, contains):
    base, fused = made
    args = [a.format(base=base, fused=fused, tmp=tmp_path) for a in argv]
    if args[0] in ("fuse", "export", "unfuse") and "-o" not in args and len(args) > 1:
        args += ["-o", str(tmp_path / "out")]
    before = tree_digest(fused.parent)
    code, err = run_cli(args, capsys)
    assert_clean_failure(code, err, tmp_path, contains=contains)
    assert not (tmp_path / "out").exists()
    assert tree_digest(fused.parent) == before


@pytest.mark.parametrize("kwargs,contains", [
    ({"device": "tpu"}, "`device`"), ({"dtype": "int8"}, "int8"), ({"rope_defaults": "x"}, "`rope_defaults`"),
    ({"base": "BASE"}, "not an adapter"),
])
def test_bad_arguments_to_load_fused(made, kwargs, contains):
    base, fused = made
    kwargs = {k: (base if v == "BASE" else v) for k, v in kwargs.items()}
    with pytest.raises(FusionSurgeryError, match=contains):
        fs.load_fused(fused, **kwargs)


# ---------------------------------------------------------------- symlinked shards
def _into_store(src: Path, linked: Path, store: Path, sidecars: bool = True) -> Path:
    """A copy of ``src`` at ``linked`` whose files live in a content store (like DVC's cache or
    git-annex), symlinked from there."""
    linked.mkdir()
    store.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors" or (sidecars and f.name == "generation_config.json"):
            blob = store / tree_digest(f).popitem()[1][:16]
            shutil.copyfile(f, blob)
            (linked / f.name).symlink_to(blob)
        else:
            shutil.copyfile(f, linked / f.name)
    return linked


def _no_links(directory: Path) -> None:
    assert not [p for p in directory.rglob("*") if p.is_symlink()], "symlinks written into an output"


def test_symlinked_shards_are_followed_by_every_command(made, tmp_path, capsys):
    """Shards in a content store outside the directory: refused by default (io.links), followed by
    every command with --follow-symlinks (as cp -L), and no symlink is ever written into an output."""
    base, fused = made
    linked_base = _into_store(base, tmp_path / "base", tmp_path / "dvc" / "cache")
    linked_fused = _into_store(fused, tmp_path / "fused-in", tmp_path / "annex" / "objects")
    follow = ["--follow-symlinks"]
    capsys.readouterr()
    code, err = run_cli(["fuse", str(linked_base), "--layers", "0,2", "-o", str(tmp_path / "refused")], capsys)
    assert code == 2 and "--follow-symlinks" in err and "dvc" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()
    for layout in ([], ["--link"], ["--adapter-only"]):
        out = tmp_path / f"fused{''.join(layout)}"
        assert main(["fuse", str(linked_base), "--layers", "0,2", "-o", str(out), *layout, *follow]) == 0
        _no_links(out)
        if layout != ["--adapter-only"]:
            assert (out / "generation_config.json").is_file()
            assert tree_digest(out / "model.safetensors").popitem()[1] == tree_digest(base / "model.safetensors").popitem()[1]
    store_file = (linked_base / "model.safetensors").resolve()
    assert os.stat(tmp_path / "fused--link" / "model.safetensors").st_ino == os.stat(store_file).st_ino
    capsys.readouterr()
    assert main(["verify", str(linked_fused), "--base", str(linked_base), "--device", "cpu", *follow]) == 0
    assert main(["verify", str(tmp_path / "fused--adapter-only"), "--base", str(linked_base),
                        "--device", "cpu", *follow]) == 0
    assert main(["inspect", str(linked_fused), "--base", str(linked_base), *follow]) == 0
    for target in ("torchtune", "mllama"):
        assert main(["export", str(linked_fused), "--to", target, "-o", str(tmp_path / target), *follow]) == 0
        _no_links(tmp_path / target)
    assert main(["unfuse", str(linked_fused), "-o", str(tmp_path / "unfused"), *follow]) == 0
    _no_links(tmp_path / "unfused")
    assert tree_digest(tmp_path / "unfused" / "model.safetensors").popitem()[1] == \
        tree_digest(base / "model.safetensors").popitem()[1]
    fs.load_fused(linked_fused, follow_symlinks=True)
    fs.load_fused(tmp_path / "fused--adapter-only", base=linked_base, follow_symlinks=True)
    # a symlinked directory or file: the default output goes beside the link, not into the store
    (tmp_path / "mine").symlink_to(linked_base)
    (tmp_path / "one.safetensors").symlink_to(linked_base / "model.safetensors")
    assert main(["fuse", str(tmp_path / "mine"), "--every", "2", *follow]) == 0
    assert main(["fuse", str(tmp_path / "one.safetensors"), "--every", "2", "--num-heads", "4",
                 "--num-kv-heads", "2"]) == 0  # a file named on the command line is the user's choice
    assert (tmp_path / "mine-fused").is_dir() and (tmp_path / "one-fused").is_dir()
    # without the flag, every command that reads the directories refuses, in one line naming the flag
    capsys.readouterr()
    for args in (["verify", str(linked_fused), "--device", "cpu"], ["inspect", str(linked_fused)],
                 ["export", str(linked_fused), "--to", "hf", "-o", str(tmp_path / "no")],
                 ["unfuse", str(linked_fused), "-o", str(tmp_path / "no")],
                 ["verify", str(tmp_path / "fused--adapter-only"), "--base", str(linked_base), "--device", "cpu"]):
        code, err = run_cli(args, capsys)
        assert code == 2 and "--follow-symlinks" in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "no").exists()
    with pytest.raises(FusionSurgeryError, match="follow_symlinks=True"):
        fs.load_fused(linked_fused)


@pytest.mark.parametrize("case,contains", [
    ("dangling", "does not exist"),
    ("loop", "loop"),
    ("directory", "not a regular file"),
    ("not safetensors", "not a safetensors file"),
])
def test_bad_shard_symlinks_are_refused_in_one_line(made, tmp_path, capsys, case, contains):
    base, fused = made
    d = tmp_path / "in"
    shutil.copytree(fused, d)
    shard = d / FUSION_SHARD
    shard.unlink()
    target = {"dangling": tmp_path / "gone.safetensors", "loop": shard, "directory": tmp_path,
              "not safetensors": d / "notes.txt"}[case]  # inside the directory: io.links allows it
    if case == "not safetensors":
        target.write_text("x" * 64)
    shard.symlink_to(target)
    for args in (["inspect", str(d)], ["unfuse", str(d), "-o", str(tmp_path / "out")],
                 ["export", str(d), "--to", "hf", "-o", str(tmp_path / "out")]):
        code, err = run_cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and contains in err, err
        assert FUSION_SHARD in err
    code, err = run_cli(["verify", str(d), "--device", "cpu"], capsys)
    assert code in (1, 2) and "Traceback" not in err
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_debris_is_told_from_a_live_run_by_its_lock_not_its_pid(made, tmp_path):
    """After a reboot the pid in a dead run's directory name may belong to a live process: what
    counts is the lock the run held (the kernel drops it when the run dies)."""
    base, _ = made
    out = tmp_path / "out"
    reused = tmp_path / f".out.tmp-{os.getpid()}-deadbeef"  # a live pid, but nobody holds the lock
    reused.mkdir()
    live = tmp_path / ".out.tmp-1-cafecafe"  # another run, still writing: it holds the lock
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(60)", str(live)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["fuse", str(base), "--every", "2", "-o", str(out)]) == 0
        assert not reused.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["fuse", str(base), "--every", "2", "-o", str(out), "--force"]) == 0
    assert hidden(tmp_path) == []


def test_an_adapter_on_a_changed_base_names_the_tensors(made, tmp_path, capsys):
    """One flipped bit in the base of an adapter (fuse --adapter-only): every command that reads the
    adapter with that base names the changed tensor."""
    base, _ = made
    adapter = tmp_path / "adapter"
    assert main(["fuse", str(base), "--layers", "1", "--adapter-only", "-o", str(adapter)]) == 0
    changed = tmp_path / "base"
    shutil.copytree(base, changed)
    _flip(changed, ORIGINAL)
    capsys.readouterr()
    with pytest.raises(FusionSurgeryError, match=ORIGINAL):
        fs.load_fused(adapter, base=changed)
    code, err = run_cli(["export", str(adapter), "--base", str(changed), "--to", "hf", "-o", str(tmp_path / "out")],
                        capsys)
    assert code == 2 and ORIGINAL in err and len(err.strip().splitlines()) == 1, err
    code = main(["verify", str(adapter), "--base", str(changed), "--device", "cpu"])
    assert code == 1 and ORIGINAL in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_link_copies_a_shard_whose_symlink_leads_to_another_filesystem(made, tmp_path):
    base, _ = made
    store = Path("/dev/shm") / f"fusionsurgery-test-{os.getpid()}"
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test directory")
    try:
        linked = _into_store(base, tmp_path / "base", store)
        result = fs.fuse(linked, tmp_path / "out", every=2, link=True, follow_symlinks=True)
        assert any("another filesystem" in n and "model.safetensors" in n for n in result.notes), result.notes
        _no_links(tmp_path / "out")
        assert os.stat(tmp_path / "out" / "model.safetensors").st_nlink == 1
    finally:
        shutil.rmtree(store, ignore_errors=True)
