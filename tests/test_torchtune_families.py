"""export --to torchtune for the native types beyond Llama: Qwen2, Qwen3, Gemma, Phi-3.

What torchtune's names and row layouts should be is written here from torchtune's conventions
(``models/*/_convert_weights.py`` and component builders), independently of the tool: Gemma's q/k
rows are permuted per head (its builder rotates interleaved pairs), Qwen2/Qwen3/Phi-3 keep them
(their builders rotate halves), Phi-3's fused projections are split. Tests that build torchtune's own
decoders run where torchtune imports (it needs torchao); the rest always run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fusionsurgery as fs
from fusionsurgery.arch.config import read_model_config
from fusionsurgery.cli import main
from fusionsurgery.errors import UsageError
from fusionsurgery.exporting import export
from fusionsurgery.io.checkpoint import Checkpoint
from helpers import ARCHS, make_base, read_json, same_checkpoint, tokens
from test_export import set_gates

FAMILY_ARCHS = ("qwen2", "qwen3", "gemma", "phi3")
HEADS, KV_HEADS, DIM, HIDDEN, VOCAB = 4, 2, 64, 96, 128
FUSED = (1, 3)  # --every 2 on four layers

# Hugging Face -> torchtune names, as torchtune's converters spell them (per-layer suffixes; Gemma 2's
# projections too, test_torchtune_gemma2)
LAYER = {"input_layernorm.weight": "sa_norm.scale", "post_attention_layernorm.weight": "mlp_norm.scale",
          "self_attn.q_proj.weight": "attn.q_proj.weight", "self_attn.k_proj.weight": "attn.k_proj.weight",
          "self_attn.v_proj.weight": "attn.v_proj.weight", "self_attn.q_proj.bias": "attn.q_proj.bias",
          "self_attn.k_proj.bias": "attn.k_proj.bias", "self_attn.v_proj.bias": "attn.v_proj.bias",
          "self_attn.o_proj.weight": "attn.output_proj.weight", "self_attn.q_norm.weight": "attn.q_norm.scale",
          "self_attn.k_norm.weight": "attn.k_norm.scale", "mlp.gate_proj.weight": "mlp.w1.weight",
          "mlp.up_proj.weight": "mlp.w3.weight", "mlp.down_proj.weight": "mlp.w2.weight"}
# the fusion block: DESIGN.md section 3, HF column -> torchtune column (any type; test_torchtune_gemma2 too)
FUSION = {"cross_attn.q_proj.weight": "attn.q_proj.weight", "cross_attn.k_proj.weight": "attn.k_proj.weight",
           "cross_attn.v_proj.weight": "attn.v_proj.weight", "cross_attn.o_proj.weight": "attn.output_proj.weight",
           "cross_attn.q_norm.weight": "attn.q_norm.scale", "cross_attn.k_norm.weight": "attn.k_norm.scale",
           "input_layernorm.weight": "ca_norm.scale", "post_attention_layernorm.weight": "mlp_norm.scale",
           "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.up_proj.weight": "mlp.w3.weight",
           "mlp.down_proj.weight": "mlp.w2.weight", "cross_attn_attn_gate": "ca_scale.scale",
           "cross_attn_mlp_gate": "mlp_scale.scale"}
_GLOBAL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.scale",
           "lm_head.weight": "output.weight"}


def head_dim(arch: str) -> int:
    return ARCHS[arch].get("head_dim", DIM // HEADS)


def interleave(w: torch.Tensor, hd: int) -> torch.Tensor:
    """Rows of each head from HF's half layout to interleaved pairs: split each head in halves, zip them."""
    rest = w.shape[1:]
    heads = w.shape[0] // hd
    return w.reshape(heads, 2, hd // 2, *rest).transpose(1, 2).reshape(heads * hd, *rest)


def expected_torchtune(hf: dict[str, torch.Tensor], *, hd: int, interleave_qk: bool, layer: dict[str, str] = LAYER,
                       global_names: dict[str, str] = _GLOBAL) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(what torchtune's checkpointer would hold for ``hf``, the names whose bytes moved).

    Args:
        hf: the tensors in Hugging Face names.
        hd: the head dimension.
        interleave_qk: the type's torchtune builder rotates interleaved pairs (its q/k rows move per head).
        layer: per-layer suffixes, HF -> torchtune (Gemma 2 names its four norms its own way).
        global_names: the tensors outside the layers, HF -> torchtune.
    """
    out: dict[str, torch.Tensor] = {}
    moved: set[str] = set()
    for key, w in hf.items():
        if key in global_names:
            out[global_names[key]] = w
            continue
        _, _, i, rest = key.split(".", 3)
        if rest.startswith("fusion_layer."):
            out[f"layers.{i}.fusion_layer.{FUSION[rest.removeprefix('fusion_layer.')]}"] = w
        elif rest == "self_attn.qkv_proj.weight":  # Phi-3: q rows, k rows, v rows
            q, k, v = torch.split(w, [HEADS * hd, KV_HEADS * hd, KV_HEADS * hd])
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"layers.{i}.attn.{name}.weight"] = part
                moved.add(f"layers.{i}.attn.{name}.weight")
        elif rest == "mlp.gate_up_proj.weight":  # Phi-3: gate rows, up rows
            for name, part in zip(("w1", "w3"), w.chunk(2)):
                out[f"layers.{i}.mlp.{name}.weight"] = part
                moved.add(f"layers.{i}.mlp.{name}.weight")
        else:
            new = f"layers.{i}.{layer[rest]}"
            if interleave_qk and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                w = interleave(w, hd)
                moved.add(new)
            out[new] = w
    return out, moved


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.fixture(scope="module", params=FAMILY_ARCHS)
def family(request, tmp_path_factory):
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"tt-{arch}")
    base, ref = make_base(tmp, arch)
    fused = tmp / "fused"
    fs.fuse(base, fused, every=2, seed=4)
    result = export(fused, tmp / "tune", to="torchtune")
    return arch, tmp, base, ref, fused, tmp / "tune", result


def test_names_rows_and_bytes_are_torchtunes(family):
    arch, _, _, _, fused, tune, result = family
    want, moved = expected_torchtune(all_tensors(fused), hd=head_dim(arch), interleave_qk=arch == "gemma")
    got = all_tensors(tune)
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        assert got[key].dtype == w.dtype and torch.equal(got[key], w), key
    transformed = {e["name"] for e in read_json(tune / "export_manifest.json")["transformed"]}
    assert transformed == moved == {t["name"] for t in result.transformed}
    assert ("output.weight" in got) == (not ARCHS[arch].get("tie_word_embeddings", arch == "gemma"))
    if arch == "phi3":
        assert not any("qkv_proj" in k or "w13" in k for k in got)
    layout = "permuted per head" if arch == "gemma" else "q/k rows kept"
    assert any(layout in n for n in result.notes), result.notes


def test_round_trip_to_hf_is_bit_identical(family):
    _, tmp, _, _, fused, tune, _ = family
    back = tmp / "back"
    export(tune, back, to="hf")
    same_checkpoint(fused, back)
    assert read_json(back / "config.json") == read_json(fused / "config.json")
    a, b = read_json(fused / "fusion_manifest.json"), read_json(back / "fusion_manifest.json")
    for section in ("new_tensors", "original_tensors"):
        assert [(e["name"], e["shape"], e["digest"]) for e in a[section]] == \
            [(e["name"], e["shape"], e["digest"]) for e in b[section]]
    assert b["base"]["num_tensors"] == a["base"]["num_tensors"]


def test_the_export_reads_back_as_the_same_model(family):
    """load_fused reads torchtune's names with the type's own RoPE layout: the base's logits with closed
    gates, the HF-named fused model's with open ones; verify, inspect and unfuse accept it."""
    arch, tmp, base, ref, fused, tune, _ = family
    cfg = read_model_config(Checkpoint.open(tune))
    assert (cfg.family, cfg.model_type) == ("torchtune", arch)
    assert cfg.rope_layout == ("interleaved" if arch == "gemma" else "half")
    t = tokens(vocab=VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(fs.load_fused(tune, dtype=torch.float32)(t), ref(t).logits, atol=1e-5, rtol=0)
    opened = tmp / "open"
    shutil.copytree(fused, opened)
    set_gates(opened, 0.4)
    export(opened, tmp / "open-tune", to="torchtune")
    enc = torch.randn(2, 5, DIM)
    with torch.no_grad():
        theirs = fs.load_fused(tmp / "open-tune", dtype=torch.float32)(t, encoder_input=enc)
        ours = fs.load_fused(opened, dtype=torch.float32)(t, encoder_input=enc)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs - fs.load_fused(fused, dtype=torch.float32)(t).detach()).abs().max() > 1e-3  # the gates matter
    assert main(["verify", str(tune), "--device", "cpu"]) == 0
    assert main(["inspect", str(tune), "--json"]) == 0
    fs.unfuse(tune, tmp / "tune-unfused")
    export(base, tmp / "tune-base", to="torchtune")
    same_checkpoint(tmp / "tune-unfused", tmp / "tune-base")


def test_a_torchtune_named_base_fuses_like_the_hf_one(family):
    arch, tmp, _, ref, fused, _, _ = family
    tune_base = tmp / "tune-base-2"
    export(fused.parent / f"{arch}-base", tune_base, to="torchtune")
    tune_fused = tmp / "tune-fused"
    fs.fuse(tune_base, tune_fused, every=2, seed=4)
    a, b = Checkpoint.open(fused), Checkpoint.open(tune_fused)
    assert a.read_bytes("model.layers.1.fusion_layer.cross_attn.q_proj.weight") == \
        b.read_bytes("layers.1.fusion_layer.attn.q_proj.weight")
    t = tokens(vocab=VOCAB, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fs.load_fused(tune_fused, dtype=torch.float32)(t), ref(t).logits, atol=1e-5, rtol=0)
    back = tmp / "tune-fused-hf"
    export(tune_fused, back, to="hf")
    same_checkpoint(back, fused)  # the same fused model, whichever naming it was fused in


def test_mllama_refuses_these_types_in_either_naming(family):
    arch, tmp, _, _, fused, tune, _ = family
    for source in (fused, tune):
        with pytest.raises(UsageError, match="Mllama's text model is a plain Llama decoder"):
            export(source, tmp / "m", to="mllama")
    assert not (tmp / "m").exists()


def test_a_type_without_native_modules_is_refused_naming_the_covered_types(tmp_path, capsys):
    from any_decoder import save_tiny

    base = save_tiny("gpt2", tmp_path / "gpt2")
    fused = tmp_path / "fused"
    fs.fuse(base, fused, every=2)
    assert main(["export", str(fused), "--to", "torchtune", "-o", str(tmp_path / "t")]) != 0
    err = capsys.readouterr().err
    assert "not one this export covers" in err and "qwen2, qwen3, gemma, phi3" in err and "gpt2" in err
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- against torchtune itself
#: torchtune's builder for each type where its name differs (Llama 3's, with plain RoPE).
BUILDERS = {"llama": "llama3"}


def _torchtune_builder(arch: str):
    """torchtune's component builder of ``arch`` and its modules; skipped where torchtune does not import."""
    name = BUILDERS.get(arch, arch)
    try:
        import torchtune.modules as tt
        from torchtune.modules.model_fusion import FusionLayer
        module = __import__(f"torchtune.models.{name}", fromlist=[name])
    except Exception as e:  # noqa: BLE001  (ImportError, a broken torchao build, or no such family yet)
        pytest.skip(f"torchtune's {name} builder does not import here: {type(e).__name__}: {e}")
    return getattr(module, name), tt, FusionLayer


def torchtune_fused_decoder(arch: str, fusion: dict):
    """torchtune's own decoder for ``arch`` at the tiny sizes, layers 1 and 3 wrapped in torchtune's
    FusionLayer around a TransformerCrossAttentionLayer built as the ``fusion`` section describes
    (norm convention and epsilons, activation)."""
    builder, tt, FusionLayer = _torchtune_builder(arch)
    a = ARCHS[arch]
    hd = head_dim(arch)
    common = dict(vocab_size=VOCAB, num_layers=4, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
                  intermediate_dim=HIDDEN, max_seq_len=256, norm_eps=a["rms_norm_eps"], rope_base=a["rope_theta"])
    if arch == "qwen2":
        decoder = builder(**common, tie_word_embeddings=True)
    elif arch == "llama":
        decoder = builder(**common)
    elif arch == "qwen3":
        decoder = builder(**common, head_dim=hd, q_proj_bias=False, k_proj_bias=False, v_proj_bias=False,
                          q_norm=True, k_norm=True, tie_word_embeddings=False)
    elif arch == "gemma":
        decoder = builder(**common, head_dim=hd)
    else:
        decoder = builder(**common)
    assert fusion["norm_offset"] == (1.0 if arch == "gemma" else 0.0)
    if arch == "gemma":  # the fusion block follows the base's norm convention (1 + w) and activation
        from torchtune.models.gemma._component_builders import gemma_mlp
        from torchtune.models.gemma.rms_norm import GemmaRMSNorm as Norm

        def mlp():
            return gemma_mlp(DIM, HIDDEN)
    else:
        Norm = tt.RMSNorm

        def mlp():
            return tt.FeedForward(gate_proj=torch.nn.Linear(DIM, HIDDEN, bias=False),
                                  down_proj=torch.nn.Linear(HIDDEN, DIM, bias=False),
                                  up_proj=torch.nn.Linear(DIM, HIDDEN, bias=False))
    for i in FUSED:
        attn = tt.MultiHeadAttention(
            embed_dim=DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=hd,
            q_proj=torch.nn.Linear(DIM, HEADS * hd, bias=False), k_proj=torch.nn.Linear(DIM, KV_HEADS * hd, bias=False),
            v_proj=torch.nn.Linear(DIM, KV_HEADS * hd, bias=False),
            output_proj=torch.nn.Linear(HEADS * hd, DIM, bias=False),
            q_norm=Norm(hd, eps=fusion["qk_norm_eps"]), k_norm=Norm(hd, eps=fusion["qk_norm_eps"]),
            pos_embeddings=None, max_seq_len=16, is_causal=False)
        block = tt.TransformerCrossAttentionLayer(attn=attn, mlp=mlp(), ca_norm=Norm(DIM, eps=fusion["norm_eps"]),
                                                  mlp_norm=Norm(DIM, eps=fusion["norm_eps"]), ca_scale=tt.TanhGate(),
                                                  mlp_scale=tt.TanhGate())
        decoder.layers[i] = FusionLayer(decoder.layers[i], block)
    return decoder


def test_torchtune_itself_loads_strictly_and_agrees(family):
    """torchtune's own builder loads the export with strict=True and computes what load_fused computes:
    the base with closed gates, the fused model with open ones."""
    arch, tmp, _, ref, fused, tune, _ = family
    agrees_with_torchtune(arch, tmp, ref, fused, tune)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_torchtune_itself_agrees_on_llama_and_mistral_without_torchvision(arch, tmp_path):
    """The same for the first two types through torchtune's plain ``llama3`` and ``mistral`` builders
    (``llama3_2_vision_decoder`` needs torchvision): a base with plain RoPE and no sliding window,
    the settings those builders have."""
    _torchtune_builder(arch)
    base, ref = make_base(tmp_path, arch, **({"rope_scaling": None} if arch == "llama" else {"sliding_window": None}))
    fs.fuse(base, tmp_path / "fused", every=2, seed=4)
    export(tmp_path / "fused", tmp_path / "tune", to="torchtune")
    agrees_with_torchtune(arch, tmp_path, ref, tmp_path / "fused", tmp_path / "tune")


def agrees_with_torchtune(arch: str, tmp: Path, ref, fused: Path, tune: Path) -> None:
    """torchtune's decoder of ``arch`` loads ``tune`` strictly: the base's logits with closed gates, and
    load_fused's with the gates of ``fused`` opened (exported again)."""
    decoder = torchtune_fused_decoder(arch, read_json(tune / "config.json")["fusion"])
    t = tokens(vocab=VOCAB, seed=3)
    enc = torch.randn(2, 5, DIM)
    decoder.load_state_dict(all_tensors(tune), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(decoder.eval()(t, encoder_input=enc), ref(t).logits, atol=1e-4, rtol=0)
    opened = tmp / "open-tt"
    shutil.copytree(fused, opened)
    set_gates(opened, 0.4)
    export(opened, tmp / "open-tt-tune", to="torchtune")
    decoder.load_state_dict(all_tensors(tmp / "open-tt-tune"), strict=True)
    with torch.no_grad():
        theirs = decoder(t, encoder_input=enc)
        ours = fs.load_fused(opened, dtype=torch.float32)(t, encoder_input=enc)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert (theirs - ref(t).logits).abs().max() > 1e-3  # the open gates change the output
