"""Issue 29, rule 2: a multimodal wrapper is fused in its text decoder, found from the config's text part.

Each wrapper type transformers builds tiny (``any_decoder.WRAPPERS``: Gemma 3, Mistral 3, Llama 4,
Qwen3.5, Qwen2.5-VL, Idefics 3 ...) is built with its vision tower as deep as its text decoder, the
case where the order lists are found in used to decide (Gemma 3's fusion went into
``vision_tower.encoder.layers``). Fused, it must be fused in the text decoder's layers (the tensors
under the section's prefix are the text layers' own), pass ``inspect`` and ``verify`` (its forward
through transformers), and open through ``fusionsurgery.hf`` as the wrapper's own class with the
blocks on the text layers and closed gates giving the base's own logits. Then the refusals: a
section pointing at the tower fails ``verify`` and ``fusionsurgery.hf``; two lists the text part
cannot tell apart are refused naming both and ``--layer-prefix``, which chooses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from any_decoder import TEXT_PARTS, WRAPPERS, build_model, missing_reason, text_ids, type_params
from helpers import assert_clean_failure, read_json, run_cli

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("fusionsurgery.hf")

from fusionsurgery.errors import CheckpointError, UsageError  # noqa: E402
from fusionsurgery.io.checkpoint import Checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a busy machine
    yield
    torch.set_num_threads(threads)


def _tower_depths(config) -> dict[str, int]:
    """Depth of every sub-config that is not the text part (vision, audio ... towers)."""
    doc = config.to_dict()
    depths = {}
    for key, value in doc.items():
        if isinstance(value, dict) and key not in TEXT_PARTS:
            for name in ("num_hidden_layers", "depth", "num_layers"):
                if isinstance(value.get(name), int):
                    depths[key] = value[name]
                    break
    return depths


def _text_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The text decoder's layers, as transformers' own ``get_decoder()`` names the text part."""
    decoder = model.get_decoder()
    while not hasattr(decoder, "layers"):
        decoder = decoder.model
    return decoder.layers


def _needs(model_type: str) -> None:
    """Skip, with the library's reason, where the installed transformers is older than ``model_type`` needs
    (``fusionsurgery._requirements.TRANSFORMERS_FOR_TYPE``: Gemma 3's saved names before 5.6.0)."""
    reason = missing_reason(model_type)
    if reason:
        pytest.skip(reason)


def _save(model_type: str, path: Path) -> tuple[torch.nn.Module, Path]:
    _needs(model_type)
    model = build_model(model_type, wrapper=True)
    model.save_pretrained(str(path))
    return model, path


def _json_cli(args: list[str], capsys) -> tuple[int, dict]:
    from fusionsurgery.cli import main

    code = main(args)
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else {}


@pytest.mark.parametrize("model_type", type_params(WRAPPERS))
def test_a_wrapper_is_fused_in_its_text_decoder(model_type, tmp_path, capsys):
    model, base = _save(model_type, tmp_path / "base")
    text_depth = model.config.get_text_config().num_hidden_layers
    towers = _tower_depths(model.config)
    assert towers and set(towers.values()) == {text_depth}, towers  # the towers are as deep as the decoder
    _fused_in_the_text_decoder(model, base, tmp_path, capsys)


@pytest.mark.parametrize("model_type", type_params(["gemma3", "mistral3"]))
def test_a_tower_as_wide_as_the_decoder_is_told_apart_by_the_token_embedding(model_type, tmp_path, capsys):
    """Depth and width alike: the language-model part of the wrapper (the list beside the token
    embedding) decides."""
    from any_decoder import TINY, build_config, instantiate

    config = build_config(model_type)
    vision = config.vision_config
    vision.hidden_size, vision.intermediate_size = TINY["hidden_size"], TINY["intermediate_size"]
    vision.num_attention_heads = TINY["num_attention_heads"]
    if getattr(vision, "head_dim", None):
        vision.head_dim = TINY["head_dim"]
    torch.manual_seed(0)
    model = instantiate(model_type, config, wrapper=True).eval()
    model.save_pretrained(str(tmp_path / "base"))
    assert _tower_depths(model.config)["vision_config"] == TINY["num_hidden_layers"]
    _fused_in_the_text_decoder(model, tmp_path / "base", tmp_path, capsys)


def _fused_in_the_text_decoder(model: torch.nn.Module, base: Path, tmp_path: Path, capsys) -> None:
    """Fuse ``base`` (saved from ``model``) --every 2; the section is the text decoder's, inspect and verify
    pass, and fusionsurgery.hf's closed gates give the base's logits."""
    text_depth = model.config.get_text_config().num_hidden_layers
    capsys.readouterr()
    fused = tmp_path / "fused"
    code, err = run_cli(["fuse", str(base), "--every", "2", "-o", str(fused)], capsys)
    assert code == 0, err

    # the section's layers hold the text decoder's own tensors (transformers' module for its text part)
    section = read_json(fused / "config.json")["fusion"]
    prefix = section["layer_prefix"]
    text_layers = _text_layers(model)
    assert len(text_layers) == text_depth
    ckpt = Checkpoint.open(fused)
    for i in (0, text_depth - 1):
        own = [p.detach() for p in text_layers[i].parameters()]
        saved = [k for k in ckpt.keys() if k.startswith(f"{prefix}.{i}.") and ".fusion_layer." not in k]
        assert saved and len(saved) == len(own), (prefix, saved)
        for key in saved:
            tensor = ckpt.read_tensor(key)
            assert any(p.shape == tensor.shape and torch.equal(p, tensor) for p in own), key

    code, summary = _json_cli(["inspect", str(fused), "--json"], capsys)
    assert code == 0 and summary["layer_prefix"] == prefix and summary["num_layers"] == text_depth
    code, report = _json_cli(["verify", str(fused), "--json"], capsys)
    assert code == 0, report
    assert all(c["status"] in ("passed", "skipped") for c in report["checks"])
    assert {c["name"]: c["status"] for c in report["checks"]}["identity"] == "passed"

    # fusionsurgery.hf: the class it opens the base's config.json as (the wrapper's own, or the causal LM the
    # causal-LM mapping names: Qwen3.5's and Llama 4's text model), blocks on the text layers, closed gates =
    # that class's own logits of the base
    from fusionsurgery.hf.loading import base_class

    ids = text_ids(model.config, 8)
    reference = base_class(read_json(base / "config.json")).from_pretrained(str(base), dtype=torch.float32).eval()
    opened = hf.from_pretrained(fused, dtype=torch.float32).eval()
    assert isinstance(opened, type(reference)) and type(opened).__name__ == f"Fused{type(reference).__name__}"
    assert [i for i, layer in enumerate(_text_layers(opened)) if hasattr(layer, "fusion_layer")] == \
        section["layers"]
    with torch.no_grad():
        expected = reference(ids).logits
        got = opened(ids, cross_attention_states=torch.randn(1, 3, opened.fusion.encoder_dim)).logits
    assert torch.equal(got, expected)


def _fuse_in_the_tower(base: Path, out: Path, monkeypatch) -> str:
    """What the old finder wrote for an equal-depth Gemma 3: the fusion section at the vision tower's layers."""
    from fusionsurgery.arch import discovery
    import fusionsurgery as fs

    keys = Checkpoint.open(base).keys()
    tower = next(k.split(".0.")[0] for k in keys if k.startswith("vision_tower.") and ".0." in k)
    with monkeypatch.context() as patch:
        patch.setattr(discovery, "find_layer_prefix", lambda *args, **kwargs: tower)
        fs.fuse(base, out, every=2)
    assert read_json(out / "config.json")["fusion"]["layer_prefix"] == tower
    return tower


def test_a_section_at_the_vision_tower_fails_verify_and_hf(tmp_path, capsys, monkeypatch):
    _, base = _save("gemma3", tmp_path / "base")
    fused = tmp_path / "fused"
    tower = _fuse_in_the_tower(base, fused, monkeypatch)
    from fusionsurgery.verification import verify

    structure = verify(fused).check("structure")
    assert structure.failed
    detail = " ".join(structure.details)
    assert "the fusion section's layers are not the text decoder's" in detail
    assert tower in detail and "language_model.model.layers is" in detail
    code, err = run_cli(["verify", str(fused)], capsys)
    assert code == 1 and "1 check(s) failed: structure" in err
    with pytest.raises(CheckpointError, match="not the text decoder's"):
        hf.from_pretrained(fused, dtype=torch.float32)


def _two_stacks(path: Path) -> Path:
    """A made-up wrapper with two lists of the text depth and width, as near the token embedding:
    the config's text part cannot tell them apart."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    names = {"model.embed_tokens.weight": (50, 32), "lm_head.weight": (50, 32)}
    for stack in ("model.text.layers", "model.audio.layers"):
        for i in range(3):
            names.update({f"{stack}.{i}.attn.qkv.weight": (96, 32), f"{stack}.{i}.norm.weight": (32,)})
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(*s, generator=g) for k, s in names.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "made_up_av", "text_config": {"hidden_size": 32, "num_hidden_layers": 3,
                                                    "num_attention_heads": 4, "vocab_size": 50}}))
    return path


def test_two_lists_the_text_part_cannot_tell_apart(tmp_path, capsys, monkeypatch):
    import fusionsurgery as fs
    from fusionsurgery.verification import runner
    from fusionsurgery.verification.engine import Engine

    base = _two_stacks(tmp_path / "av")
    code, err = run_cli(["fuse", str(base), "--every", "3", "-o", str(tmp_path / "f")], capsys)
    assert_clean_failure(code, err, tmp_path, contains="two numbered lists could be the text decoder's 3 layers")
    assert "model.audio.layers.N and model.text.layers.N" in err and "--layer-prefix" in err
    with pytest.raises(CheckpointError, match="name one with `layer_prefix`$"):
        fs.fuse(base, tmp_path / "g", every=3)

    # the option chooses; verify passes the chosen list
    code, err = run_cli(["fuse", str(base), "--every", "3", "--layer-prefix", "model.text.layers", "-o",
                         str(tmp_path / "f")], capsys)
    assert code == 0, err
    assert read_json(tmp_path / "f" / "config.json")["fusion"]["layer_prefix"] == "model.text.layers"
    monkeypatch.setattr(runner, "forward_engine", lambda cfg, doc=None: Engine("skip", "a made-up type: no forward"))
    code, report = _json_cli(["verify", str(tmp_path / "f"), "--json"], capsys)
    assert code == 0 and {c["name"]: c["status"] for c in report["checks"]}["structure"] == "passed"

    # a list that is not a candidate is refused in the library's terms, and in the CLI's
    with pytest.raises(UsageError, match=r"^`layer_prefix` 'model.vision' is not a numbered list of the text "
                                         r"decoder's layers: model.audio.layers or model.text.layers is$"):
        fs.fuse(base, tmp_path / "h", every=3, layer_prefix="model.vision")
    code, err = run_cli(["fuse", str(base), "--every", "3", "--layer-prefix", "model.vision", "-o",
                         str(tmp_path / "h")], capsys)
    assert_clean_failure(code, err, tmp_path, contains="--layer-prefix 'model.vision' is not a numbered list")
    assert not (tmp_path / "h").exists()


def test_the_option_cannot_pick_a_tower_the_text_part_rules_out(tmp_path, capsys):
    _, base = _save("gemma3", tmp_path / "base")
    capsys.readouterr()
    code, err = run_cli(["fuse", str(base), "--every", "2", "--layer-prefix", "vision_tower.encoder.layers",
                         "-o", str(tmp_path / "f")], capsys)
    assert_clean_failure(code, err, tmp_path, contains="is not the text decoder's layer list")
    assert not (tmp_path / "f").exists()
    assert "language_model.model.layers is" in err
    code, err = run_cli(["fuse", str(base), "--every", "2", "--layer-prefix", "language_model.model.layers",
                         "-o", str(tmp_path / "f")], capsys)
    assert code == 0, err


def test_hf_attaches_blocks_only_where_the_section_says():
    """The section's prefix in the checkpoint's names (transformers' saved names) or the module's; a list
    that is not the text decoder's, or no list at all, is refused rather than replaced by another."""
    from fusionsurgery.hf.layers import decoder_layer_path

    _needs("gemma3")

    model = build_model("gemma3", wrapper=True)
    for prefix in ("language_model.model.layers", "model.language_model.layers"):
        model.config.fusion = {"layer_prefix": prefix}
        assert decoder_layer_path(model) == "model.language_model.layers"
    model.config.fusion = {"layer_prefix": "vision_tower.encoder.layers"}
    with pytest.raises(CheckpointError, match=r"^the fusion section's layers, vision_tower.encoder.layers "
                                              r"\(model.vision_tower.encoder.layers in .*\), are not the text "
                                              r"decoder's: .*model.language_model.layers is$"):
        decoder_layer_path(model)
    model.config.fusion = {"layer_prefix": "model.nowhere.layers"}
    with pytest.raises(CheckpointError, match="layer_prefix 'model.nowhere.layers' is none of"):
        decoder_layer_path(model)
