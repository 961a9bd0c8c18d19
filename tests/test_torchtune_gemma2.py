"""export --to torchtune for Gemma 2, a type whose forward here is transformers' (no native modules).

The torchtune names are written here from torchtune's Gemma 2 builder (``models/gemma2``): four
norms per layer (``sa_norm`` before attention, ``sa_scale`` after it, ``mlp_norm`` before the MLP,
``mlp_scale`` after it, as ``TransformerSelfAttentionLayer`` applies them), the final norm under
``norm.rms_norm``, a tied output; q/k rows interleaved per head (its RoPE rotates pairs). The parity
test builds torchtune's own ``gemma2`` and compares its logits with transformers' ``Gemma2ForCausalLM``;
it is skipped with a reason where torchtune does not import.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import fusionsurgery as fs
from fusionsurgery.exporting import export
from fusionsurgery.io.checkpoint import Checkpoint
from any_decoder import save_tiny
from helpers import assert_clean_failure, read_json, run_cli, same_checkpoint, tokens
from test_torchtune_families import LAYER, all_tensors
from test_torchtune_families import expected_torchtune as families_expected

HEAD_DIM, HEADS, KV_HEADS = 16, 4, 2  # any_decoder.TINY
#: Gemma 2 settings that change the function, so that a builder ignoring one would show in the logits.
SETTINGS = dict(attn_logit_softcapping=1.5, query_pre_attn_scalar=24, final_logit_softcapping=None,
                sliding_window=4, attn_implementation="eager")

# Hugging Face -> torchtune names of Gemma 2, per layer: the projections as for every type, and four
# norms named by what each does (before / after the attention, before / after the MLP)
_LAYER = {**{hf: tune for hf, tune in LAYER.items() if "layernorm" not in hf},
          "input_layernorm.weight": "sa_norm.scale", "post_attention_layernorm.weight": "sa_scale.scale",
          "pre_feedforward_layernorm.weight": "mlp_norm.scale", "post_feedforward_layernorm.weight": "mlp_scale.scale"}
_GLOBAL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.rms_norm.scale",
           "lm_head.weight": "output.weight"}


def expected_torchtune(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What torchtune's checkpointer would hold for Gemma 2's ``hf`` tensors (its builder rotates pairs)."""
    return families_expected(hf, hd=HEAD_DIM, interleave_qk=True, layer=_LAYER, global_names=_GLOBAL)[0]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """(tmp, base, fused, its torchtune export, the base's torchtune export)."""
    tmp = tmp_path_factory.mktemp("gemma2")
    base = save_tiny("gemma2", tmp / "base", **SETTINGS)
    fused = tmp / "fused"
    fs.fuse(base, fused, every=2)
    tune, tune_base = tmp / "tune", tmp / "tune-base"
    export(fused, tune, to="torchtune")
    export(base, tune_base, to="torchtune")
    return tmp, base, fused, tune, tune_base


def test_names_and_bytes_are_torchtunes(gemma2):
    _, base, fused, tune, tune_base = gemma2
    for source, out in ((fused, tune), (base, tune_base)):
        want, got = expected_torchtune(all_tensors(source)), all_tensors(out)
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert "output.weight" not in all_tensors(tune)  # Gemma 2 ties
    notes = " ".join(read_json(tune / "export_manifest.json")["notes"])
    for words in ("torchtune 0.6.1's own gemma2 converter swaps", "normed hidden state", "query_pre_attn_scalar",
                  "soft-capped at 1.5", "sliding window", "1 + w", "tied"):
        assert words in notes, words
    fusion = read_json(tune / "config.json")["fusion"]
    assert (fusion["layer_prefix"], fusion["embedding_key"]) == ("layers", "tok_embeddings.weight")
    assert read_json(tune / "fusion_manifest.json")["fusion"]["layer_prefix"] == "layers"


def _torchtune_gemma2(cfg: dict):
    try:
        from torchtune.models.gemma2._component_builders import gemma2
    except Exception as e:  # torchtune needs torchao; an unusable install is a skip, not a failure
        pytest.skip(f"torchtune's gemma2 builder does not import here: {type(e).__name__}: {e}")
    return gemma2(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                  head_dim=cfg["head_dim"], num_kv_heads=cfg["num_key_value_heads"], embed_dim=cfg["hidden_size"],
                  intermediate_dim=cfg["intermediate_size"], max_seq_len=cfg["max_position_embeddings"],
                  norm_eps=cfg["rms_norm_eps"], rope_base=cfg["rope_theta"] if "rope_theta" in cfg
                  else cfg["rope_parameters"]["rope_theta"],
                  hidden_capping_value=cfg["attn_logit_softcapping"], final_capping_value=1e9,
                  sliding_window_size=cfg["sliding_window"], query_pre_attn_scalar=cfg["query_pre_attn_scalar"])


def test_torchtunes_own_gemma2_computes_what_transformers_does(gemma2):
    import transformers

    _, base, _, tune, tune_base = gemma2
    cfg = read_json(base / "config.json")
    ids = tokens(seq=12)
    assert ids.shape[1] > 2 * cfg["sliding_window"]  # the even layers slide (in both): a window that differs shows
    hf = transformers.Gemma2ForCausalLM.from_pretrained(str(base), attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(ids).logits
    state = all_tensors(tune_base)
    fused_base = {k: v for k, v in all_tensors(tune).items() if ".fusion_layer." not in k}
    assert sorted(fused_base) == sorted(state) and all(torch.equal(fused_base[k], state[k]) for k in state)
    norms = [state[f"layers.{i}.mlp_norm.scale"] - state[f"layers.{i}.mlp_scale.scale"] for i in range(4)]
    assert all(n.abs().max() > 1e-3 for n in norms)  # random and different: a swap would show
    model = _torchtune_gemma2(cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # the names matter: torchtune 0.6.1's swapped feed-forward norms compute another function
    swapped = dict(state)
    for i in range(4):
        swapped[f"layers.{i}.mlp_norm.scale"], swapped[f"layers.{i}.mlp_scale.scale"] = \
            state[f"layers.{i}.mlp_scale.scale"], state[f"layers.{i}.mlp_norm.scale"]
    model.load_state_dict(swapped, strict=True)
    with torch.no_grad():
        assert (model(ids) - want).abs().max() > 1e-3


def test_round_trip_to_hf_is_bit_identical(gemma2):
    tmp, base, fused, tune, tune_base = gemma2
    for source, out, back in ((fused, tune, tmp / "back"), (base, tune_base, tmp / "back-base")):
        export(out, back, to="hf")
        same_checkpoint(source, back)
        assert read_json(back / "config.json") == read_json(source / "config.json")
    before, after = read_json(fused / "fusion_manifest.json"), read_json(tmp / "back" / "fusion_manifest.json")
    assert after["export"]["to_family"] == "hf" and before.get("layout") == "copy"
    # what an export changes by design: its note, the files it wrote (one file, not fuse's base + fusion
    # shards) and the source's layout; every name, shape, digest and setting comes back
    for doc in (before, after):
        doc.pop("export", None)
        doc.pop("layout", None)
        for entry in doc["new_tensors"] + doc["original_tensors"]:
            entry.pop("file")
    assert after == before


def test_inspect_unfuse_verify_read_the_export(gemma2):
    tmp, _, fused, tune, tune_base = gemma2
    info = fs.inspect_checkpoint(tune)
    assert info.model_type == "gemma2" and info.layer_prefix == "layers" and info.fusion.layers == [1, 3]
    assert "torchtune names" in info.family_description
    unfused = tmp / "tune-unfused"
    fs.unfuse(tune, unfused)
    same_checkpoint(unfused, tune_base)  # the base, in torchtune names, bytes kept
    report = fs.verify(tune)  # the forward checks through transformers' Gemma2, renamed as it loads
    assert report.ok and report.settings["engine"] == "hf", [c.details for c in report.failures]
    assert {c.name: c.status for c in report.checks} == {
        "structure": "passed", "originals": "passed", "gates": "passed", "identity": "passed", "live": "passed",
        "backward": "passed", "kv_cache": "passed", "figures": "passed"}
    # against a base: the base in the export's own names passes; in transformers' names, the naming is named
    originals = {c.name: c for c in fs.verify(tune, base=tune_base).checks}["originals"]
    assert originals.status == "passed", originals
    _, base, *_ = gemma2
    report = fs.verify(tune, base=base)
    assert not report.ok and [c.name for c in report.failures] == ["originals"]
    assert any("shares no tensor name" in m and "own names" in m for m in report.failures[0].details), report.failures[0]


def test_transformers_opens_the_torchtune_names_and_saves_them_back(gemma2):
    """fusionsurgery.hf reads the export as transformers' Gemma2 (names mapped, q/k rows moved back): the
    same weights as the Hugging Face-named source; save_pretrained writes torchtune's names and rows again."""
    tmp, _, fused, tune, _ = gemma2
    from fusionsurgery import hf

    from_tune, from_hf = hf.from_pretrained(tune, dtype=torch.float32), hf.from_pretrained(fused, dtype=torch.float32)
    a, b = from_tune.state_dict(), from_hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = tmp / "tune-saved"
    from_tune.save_pretrained(saved)
    same_checkpoint(saved, tune)  # every key, dtype and byte as the export wrote it
    for g in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):  # a trained model: the gates moved
        for layer in (1, 3):
            from_tune.get_parameter(f"model.layers.{layer}.fusion_layer.{g}").data.fill_(0.25)
    from_tune.save_pretrained(tmp / "tune-trained")
    report = fs.verify(tmp / "tune-trained", base=tmp / "tune-base")
    assert report.ok, [c.details for c in report.failures]
    assert {c.name: c.status for c in report.checks}["gates"] == "passed"


def test_cli_exports_and_refuses_an_incomplete_gemma2(gemma2, tmp_path, capsys):
    _, base, fused, _, _ = gemma2
    code, err = run_cli(["export", str(fused), "--to", "torchtune", "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert Checkpoint.open(tmp_path / "out").info("layers.1.mlp_scale.scale").shape == (64,)
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.pre_feedforward_layernorm.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(["export", str(broken), "--to", "torchtune", "-o", str(tmp_path / "bad")], capsys)
    assert_clean_failure(code, err, tmp_path, contains="model.layers.2.pre_feedforward_layernorm.weight")
    assert not (tmp_path / "bad").exists()
