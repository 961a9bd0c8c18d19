"""Outputs that are safe to publish (issue 23): no local path in any written file, no file from elsewhere.

Every command (fuse, also --adapter-only and --link; export to each target; unfuse; import; graft)
and the ``fusionsurgery.hf`` save write a tree that holds no absolute path of the machine (every text
file and every safetensors header is searched for the test's directory and the home directory), and
no bytes from outside its inputs: a sidecar symlinked to a "secret" outside the checkpoint is refused
in one line and nothing is written, unless ``--follow-symlinks`` says to copy it (as ``cp -L``). A
Hugging Face cache snapshot (files linked into the repository's ``blobs/``) is read without the flag.
About 40 s on one core; the hf save test needs transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

import fusionsurgery as fs
from fusionsurgery.cli import main
from fusionsurgery.errors import FusionSurgeryError, LinkRefused
from fusionsurgery.io.identity import input_name, public_config, public_manifest, public_text
from fusionsurgery.io.links import LinkRule
from helpers import error_lines, read_json, run_cli

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"
SECRET = b"hf_secretTOKENthatmustneverbepublished\n"


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _with_sidecars(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with tokenizer files, and a config naming its own absolute path in
    ``_name_or_path`` (as transformers 4 wrote it): a path the outputs must not carry on."""
    shutil.copytree(src, dst)
    (dst / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (dst / "chat_template.jinja").write_text("{{ messages }}")
    config = read_json(dst / "config.json")
    config["_name_or_path"] = str(dst)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _run(*args: str | Path) -> None:
    code = main([str(a) for a in args])
    assert code == 0, args


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The inputs and the output of every command, all under one temporary directory."""
    root = tmp_path_factory.mktemp("publish")
    base = _with_sidecars(EXAMPLE, root / "base")
    other = _with_sidecars(EXAMPLE, root / "other-base")
    o = {"root": root, "base": base, "other": other}
    o["fused"], o["adapter"], o["linked"] = root / "fused", root / "adapter", root / "linked"
    _run("fuse", base, "--every", "4", "-o", o["fused"])
    _run("fuse", base, "--every", "4", "--adapter-only", "-o", o["adapter"])
    _run("fuse", base, "--every", "4", "--link", "-o", o["linked"])
    for target in ("torchtune", "mllama"):
        o[target] = root / f"export-{target}"
        _run("export", o["fused"], "--to", target, "-o", o[target])
    o["hf"] = root / "export-hf"
    _run("export", o["torchtune"], "--to", "hf", "-o", o["hf"])
    o["adapter-hf"] = root / "adapter-hf"
    _run("export", o["adapter"], "--base", base, "--to", "hf", "-o", o["adapter-hf"])
    o["unfused"] = root / "unfused"
    _run("unfuse", o["fused"], "-o", o["unfused"])
    o["imported"], o["imported-adapter"] = root / "imported", root / "imported-adapter"
    _run("import", o["mllama"], "-o", o["imported"])
    _run("import", o["mllama"], "--adapter-only", "-o", o["imported-adapter"])
    o["grafted"] = root / "grafted"
    _run("graft", o["adapter"], "--onto", other, "--was", base, "-o", o["grafted"])
    o["text-base"] = root / "text-base"
    _run("unfuse", o["imported"], "-o", o["text-base"])
    o["grafted-import"] = root / "grafted-import"
    _run("graft", o["imported-adapter"], "--onto", o["text-base"], "--was", o["imported"], "-o", o["grafted-import"])
    return o


def _forbidden(root: Path) -> list[str]:
    """Strings no output may hold: the test directory (as given and resolved) and the home directory."""
    found = {str(root), os.path.realpath(root)}
    home = str(Path.home())
    if len(Path(home).parts) > 1:  # a home of "/" would match everything
        found.add(home.rstrip("/") + "/")
    return sorted(found)


def _safetensors_header(path: Path) -> str:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return fh.read(n).decode("utf-8")


def assert_publishable(out: Path, root: Path) -> None:
    """No file of ``out`` names a local path, and no file is a symlink."""
    files = sorted(p for p in out.rglob("*") if p.is_file() or p.is_symlink())
    assert files, out
    forbidden = _forbidden(root)
    for f in files:
        assert not f.is_symlink(), f"{f} is a symlink"
        if f.suffix == ".safetensors":
            header = _safetensors_header(f)
            metadata = json.loads(header).get("__metadata__") or {}
            texts = [header, *map(str, metadata.values())]
        else:
            data = f.read_bytes()
            texts = [data.decode("utf-8", errors="replace")]
        for text in texts:
            for s in forbidden:
                assert s not in text, f"{f.relative_to(out)} holds the local path {s}"


OUTPUTS = ("fused", "adapter", "linked", "torchtune", "mllama", "hf", "adapter-hf", "unfused", "imported",
           "imported-adapter", "grafted", "text-base", "grafted-import")


@pytest.mark.parametrize("name", OUTPUTS)
def test_no_output_holds_a_local_path(world, name):
    assert_publishable(world[name], world["root"])


def test_manifests_name_their_inputs(world):
    base = read_json(world["fused"] / "fusion_manifest.json")["base"]
    assert base["name"] == "base" and "path" not in base
    assert read_json(world["adapter"] / "fusion_manifest.json")["base"]["name"] == "base"
    graft = read_json(world["grafted"] / "fusion_manifest.json")["graft"]
    assert graft["adapter"]["name"] == "adapter" and graft["base"]["name"] == "other-base"
    assert graft["was"]["was"] == "base"
    imported = read_json(world["imported"] / "fusion_manifest.json")
    assert imported["mllama"]["source"] == "export-mllama"
    assert imported["base"]["imported_from"]["name"] == "export-mllama"
    exported = read_json(world["torchtune"] / "export_manifest.json")
    assert exported["source"]["name"] == "fused"
    assert read_json(world["torchtune"] / "fusion_manifest.json")["export"]["from"] == "fused"
    # the config's local _name_or_path is cut to a name; the digests still tie the adapter to its base
    assert read_json(world["fused"] / "config.json")["_name_or_path"] == "base"
    fs.load_fused(world["adapter"], base=world["base"])


def test_a_needed_base_is_asked_for_by_name(world, capsys):
    code, err = run_cli(["verify", str(world["adapter"]), "--device", "cpu"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "--base BASE" in err and "made on 'base'" in err, err
    with pytest.raises(FusionSurgeryError, match="made on 'base'"):
        fs.load_fused(world["adapter"])
    code, err = run_cli(["verify", str(world["adapter"]), "--base", str(world["base"]), "--device", "cpu"], capsys)
    assert code == 0, err


# ---------------------------------------------------------------- a secret outside, linked in
def _secret(root: Path) -> Path:
    secret = root / "elsewhere" / "token"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(SECRET)
    return secret


#: command -> (the input the link goes into, args given (input, out))
COMMANDS = {
    "fuse": ("base", lambda i, o, w: ["fuse", i, "--every", "4", "-o", o]),
    "fuse --link": ("base", lambda i, o, w: ["fuse", i, "--every", "4", "--link", "-o", o]),
    "export torchtune": ("fused", lambda i, o, w: ["export", i, "--to", "torchtune", "-o", o]),
    "export mllama": ("fused", lambda i, o, w: ["export", i, "--to", "mllama", "-o", o]),
    "export hf": ("torchtune", lambda i, o, w: ["export", i, "--to", "hf", "-o", o]),
    "export adapter": ("adapter", lambda i, o, w: ["export", i, "--base", w["base"], "--to", "hf", "-o", o]),
    "unfuse": ("fused", lambda i, o, w: ["unfuse", i, "-o", o]),
    "import": ("mllama", lambda i, o, w: ["import", i, "-o", o]),
    "graft": ("other", lambda i, o, w: ["graft", w["adapter"], "--onto", i, "-o", o]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_sidecar_linked_outside_is_refused_unless_followed(world, tmp_path, capsys, command):
    source, args = COMMANDS[command]
    secret = _secret(tmp_path)
    given = tmp_path / "input"
    shutil.copytree(world[source], given)
    (given / "tokenizer_config.json").unlink(missing_ok=True)
    (given / "tokenizer_config.json").symlink_to(secret)
    out = tmp_path / "out"
    capsys.readouterr()
    code, err = run_cli([str(a) for a in args(given, out, world)], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert "tokenizer_config.json" in err and str(secret) in err and "--follow-symlinks" in err, err
    assert not out.exists() and _hidden(tmp_path) == []
    code, err = run_cli([str(a) for a in args(given, out, world)] + ["--follow-symlinks"], capsys)
    assert code == 0, err
    copied = out / "tokenizer_config.json"
    assert not copied.is_symlink() and copied.read_bytes() == SECRET  # as cp -L would


def test_a_shard_linked_outside_is_refused_by_every_reader(world, tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    given = tmp_path / "input"
    shutil.copytree(world["fused"], given)
    shard = next(given.glob("fusion-*.safetensors"))
    shutil.move(shard, store / shard.name)
    shard.symlink_to(store / shard.name)
    for args in (["inspect", given], ["verify", given, "--device", "cpu"], ["unfuse", given, "-o", tmp_path / "out"],
                 ["export", given, "--to", "hf", "-o", tmp_path / "out"]):
        code, err = run_cli([str(a) for a in args], capsys)
        assert code == 2 and len(error_lines(err)) == 1 and shard.name in err and "--follow-symlinks" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(LinkRefused, match="follow_symlinks=True"):
        fs.load_fused(given)
    assert fs.inspect_checkpoint(given, follow_symlinks=True).fusion is not None


def test_a_manifest_linked_to_a_device_is_still_refused_when_followed(world, tmp_path, capsys):
    given = tmp_path / "input"
    shutil.copytree(world["fused"], given)
    (given / "fusion_manifest.json").unlink()
    (given / "fusion_manifest.json").symlink_to("/dev/zero")
    code, err = run_cli(["inspect", str(given), "--follow-symlinks"], capsys)
    assert code == 2 and "not a regular file" in err, err


# ---------------------------------------------------------------- links that stay inside are fine
def _hub_cache(root: Path, src: Path, repo: str = "models--org--tiny", rev: str = "0123abcd") -> Path:
    """``src`` laid out as a Hugging Face cache snapshot: every file a link into the repository's blobs/."""
    blobs, snap = root / repo / "blobs", root / repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"blob{i:04d}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i:04d}")
    return snap


def test_a_hub_cache_snapshot_is_read_without_the_flag(world, tmp_path, capsys):
    snap = _hub_cache(tmp_path / "hub", world["base"])
    out = tmp_path / "out"
    code, err = run_cli(["fuse", str(snap), "--every", "4", "-o", str(out)], capsys)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == (world["base"] / "tokenizer.json").read_bytes()
    assert read_json(out / "fusion_manifest.json")["base"]["name"] == "org/tiny"
    assert_publishable(out, tmp_path)
    fused_snap = _hub_cache(tmp_path / "hub", out, repo="models--org--tiny-fused")
    assert main(["inspect", str(fused_snap)]) == 0
    assert main(["export", str(fused_snap), "--to", "torchtune", "-o", str(tmp_path / "tt")]) == 0
    assert main(["verify", str(fused_snap), "--device", "cpu"]) == 0
    # a link from one repository's snapshot into another repository's blobs is not part of it
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(next((tmp_path / "hub" / "models--org--tiny-fused" / "blobs").iterdir()))
    capsys.readouterr()
    code, err = run_cli(["fuse", str(snap), "--every", "4", "-o", str(tmp_path / "no")], capsys)
    assert code == 2 and "tokenizer.json" in err and "--follow-symlinks" in err, err


def test_links_within_the_directory_are_followed(world, tmp_path):
    given = tmp_path / "input"
    shutil.copytree(world["base"], given)
    (given / "extra").mkdir()
    shutil.move(given / "tokenizer.json", given / "extra" / "tokenizer.json")
    (given / "tokenizer.json").symlink_to(Path("extra") / "tokenizer.json")
    (tmp_path / "through-a-link").symlink_to(given)  # the directory itself reached through a link
    result = fs.fuse(tmp_path / "through-a-link", tmp_path / "out", every=4)
    assert (result.output / "tokenizer.json").read_bytes() == (world["base"] / "tokenizer.json").read_bytes()
    assert read_json(result.output / "fusion_manifest.json")["base"]["name"] == "through-a-link"


# ---------------------------------------------------------------- manifests of earlier releases
def test_a_manifest_holding_a_path_still_works_and_is_not_carried_on(world, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(world["adapter"], old)
    manifest = read_json(old / "fusion_manifest.json")
    manifest["base"].pop("name")
    manifest["base"]["path"] = str(world["base"])  # as releases before names wrote it
    (old / "fusion_manifest.json").write_text(json.dumps(manifest))
    fs.load_fused(old, base=world["base"])
    assert main(["verify", str(old), "--base", str(world["base"]), "--device", "cpu"]) == 0
    assert "base" in " ".join(fs.inspect_checkpoint(old).notes)
    with pytest.raises(FusionSurgeryError, match="made on 'base'"):
        fs.load_fused(old)
    assert main(["export", str(old), "--base", str(world["base"]), "--to", "torchtune", "-o", str(tmp_path / "tt")]) == 0
    assert main(["graft", str(old), "--onto", str(world["other"]), "-o", str(tmp_path / "g")]) == 0
    for out in (tmp_path / "tt", tmp_path / "g"):
        assert_publishable(out, tmp_path)
        assert_publishable(out, world["root"])
    assert read_json(tmp_path / "g" / "fusion_manifest.json")["graft"]["adapter_base"]["name"] == "base"


def test_identity_helpers():
    assert public_text("/home/someone/models/llama") == "llama"
    assert public_text("the text decoder of /home/u/x/mllama (`unfuse` of a whole import)") == \
        "the text decoder of mllama (`unfuse` of a whole import)"
    assert public_text("C:\\Users\\u\\base") == "base" and public_text("org/name") == "org/name"
    doc = {"_name_or_path": "/home/u/m", "text_config": {"_name_or_path": "meta-llama/Llama-3.2-1B"}}
    assert public_config(doc) == {"_name_or_path": "m", "text_config": {"_name_or_path": "meta-llama/Llama-3.2-1B"}}
    assert doc["_name_or_path"] == "/home/u/m"  # a copy
    old = {"base": {"path": "/home/u/base"}, "graft": {"adapter": {"path": "/x/a"}, "was": {"was": "/x/w"}}}
    assert public_manifest(old) == {"base": {"name": "base"}, "graft": {"adapter": {"name": "a"}, "was": {"was": "w"}}}
    assert input_name("/a/b/c/") == "c"


def test_the_rule_alone(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "inside").write_text("x")
    (tmp_path / "outside").write_text("y")
    (d / "in-link").symlink_to("inside")
    (d / "out-link").symlink_to(tmp_path / "outside")
    rule = LinkRule.at(d)
    assert rule.allows(d / "inside") and rule.allows(d / "in-link") and not rule.allows(d / "out-link")
    assert LinkRule.at(d, follow=True).allows(d / "out-link")
    with pytest.raises(LinkRefused) as caught:
        rule.check(d / "out-link", "sidecar file")
    assert "--follow-symlinks" in caught.value.message("--follow-symlinks") and str(tmp_path / "outside") in str(caught.value)


# ---------------------------------------------------------------- the hf save
def test_hf_save_pretrained_is_publishable_and_keeps_the_rule(world, tmp_path):
    pytest.importorskip("transformers")
    hf = pytest.importorskip("fusionsurgery.hf")
    source = tmp_path / "source"
    shutil.copytree(world["fused"], source)
    manifest = read_json(source / "fusion_manifest.json")
    manifest["base"]["path"] = str(world["base"])  # an earlier release's manifest: the save drops the path
    (source / "fusion_manifest.json").write_text(json.dumps(manifest))
    model = hf.from_pretrained(source)
    model.save_pretrained(tmp_path / "saved")
    assert_publishable(tmp_path / "saved", tmp_path)
    assert_publishable(tmp_path / "saved", world["root"])
    saved = read_json(tmp_path / "saved" / "fusion_manifest.json")
    assert saved["base"]["name"] == "base" and "path" not in saved["base"]
    assert (tmp_path / "saved" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    # a sidecar of the source linked outside after loading: the save refuses it and writes nothing
    secret = _secret(tmp_path)
    (source / "tokenizer_config.json").unlink()
    (source / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(LinkRefused, match="tokenizer_config.json"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists() and _hidden(tmp_path) == []
    with pytest.raises(LinkRefused):
        hf.from_pretrained(source)
    followed = hf.from_pretrained(source, follow_symlinks=True)
    followed.save_pretrained(tmp_path / "followed")
    assert (tmp_path / "followed" / "tokenizer_config.json").read_bytes() == SECRET
