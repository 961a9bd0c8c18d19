"""The decoders the support probe used to refuse, read now (CPM-Ant, CTRL, ELECTRA, RemBERT, Nemotron-H),
and the one refused with its precise reason (XLM). The whole chain per type is in the any-decoder suites;
these pin down the reading rules themselves (no transformers needed except for the last test)."""

from __future__ import annotations

import pytest

from fusionsurgery.arch.discovery import find_embedding_key, find_layer_prefix
from fusionsurgery.arch.fields import ConfigFields
from fusionsurgery.errors import CheckpointError
from helpers import run_cli


def _layer_keys(prefix: str, n: int, names: tuple[str, ...] = ("attn.q.weight", "mlp.w.weight")) -> list[str]:
    return [f"{prefix}.{i}.{name}" for i in range(n) for name in names]


def test_embedding_names_of_cpmant_and_ctrl():
    shapes = {"cpmant.input_embedding.weight": (1152, 64), "cpmant.segment_embedding.weight": (32, 64),
              "lm_head.weight": (128, 64)}
    assert find_embedding_key(shapes, "cpmant.encoder.layers", 64, 128) == "cpmant.input_embedding.weight"
    # a plain "w" only with the vocabulary's rows (CTRL's transformer.w), and never over a proper name
    assert find_embedding_key({"transformer.w.weight": (128, 64)}, "transformer.h", 64, 128) == "transformer.w.weight"
    with pytest.raises(CheckpointError, match="no token embedding"):
        find_embedding_key({"transformer.w.weight": (96, 64)}, "transformer.h", 64, 128)
    assert find_embedding_key({"transformer.w.weight": (128, 64), "transformer.wte.weight": (128, 64)},
                              "transformer.h", 64, 128) == "transformer.wte.weight"


def test_a_factorised_embedding_is_taken_only_with_the_vocabularys_rows():
    """ELECTRA / RemBERT: word embeddings narrower or wider than the width, projected by the base."""
    shapes = {"electra.embeddings.word_embeddings.weight": (128, 32),
              "electra.embeddings.position_embeddings.weight": (256, 32),
              "electra.embeddings_project.weight": (64, 32)}
    assert find_embedding_key(shapes, "electra.encoder.layer", 64, 128) == "electra.embeddings.word_embeddings.weight"
    with pytest.raises(CheckpointError, match="no token embedding of width 64"):
        find_embedding_key(shapes, "electra.encoder.layer", 64, 500)
    # one as wide as the decoder wins over a factorised one
    shapes["model.embed_tokens.weight"] = (128, 64)
    assert find_embedding_key(shapes, "electra.encoder.layer", 64, 128) == "model.embed_tokens.weight"


def test_layer_count_from_a_per_layer_list():
    """Nemotron-H writes no count: transformers derives it from layers_block_type."""
    doc = {"model_type": "nemotron_h", "hidden_size": 64,
           "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"]}
    assert ConfigFields(doc).int_of("num_layers") == 4
    assert ConfigFields(dict(doc, num_hidden_layers=6)).int_of("num_layers") == 6  # a count wins
    with pytest.raises(CheckpointError, match="or the length of layers_block_type / layer_types"):
        ConfigFields({"hidden_size": 64}).int_of("num_layers", required=True)


def test_parallel_lists_of_sub_layers_are_refused_naming_them():
    """XLM: attention, FFN and norms are sibling numbered lists; none is a layer to wrap."""
    keys = (_layer_keys("transformer.attentions", 4, ("q_lin.weight", "k_lin.weight")) +
            _layer_keys("transformer.ffns", 4, ("lin1.weight",)) + _layer_keys("transformer.layer_norm1", 4, ("weight",)))
    with pytest.raises(CheckpointError, match=r"not modules but 3 parallel numbered lists of sub-layers "
                                              r"\(transformer.attentions.\{i\}, transformer.ffns.\{i\} ...\)"):
        find_layer_prefix(keys, 4)
    # lists of the count under different parents (a text stack and a tower) are not siblings: the
    # config's text part decides (here the token embedding beside model.layers), or the user names one
    keys = _layer_keys("model.layers", 4) + _layer_keys("vision.encoder.layers", 4, ("attn.q.weight",))
    shapes = dict.fromkeys(keys, (64, 64)) | {"model.embed_tokens.weight": (128, 64)}
    assert find_layer_prefix(shapes, 4, shapes=shapes, dim=64, vocab_size=128) == "model.layers"
    with pytest.raises(CheckpointError, match=r"^two numbered lists could be the text decoder's 4 layers "
                                              r"\(the text layer count\): model.layers.N and vision.encoder.layers.N; "
                                              r"name one with `layer_prefix`$"):
        find_layer_prefix(keys, 4)
    assert find_layer_prefix(keys, 4, chosen="vision.encoder.layers") == "vision.encoder.layers"


def test_fusion_vocab_on_a_factorised_embedding_is_refused(tmp_path, capsys):
    from any_decoder import save_tiny

    base = save_tiny("electra", tmp_path / "electra")
    capsys.readouterr()
    code, err = run_cli(["fuse", str(base), "--every", "2", "--fusion-vocab", "2", "-o", str(tmp_path / "f")], capsys)
    assert code == 2 and "--fusion-vocab" in err and "128 wide and the decoder 64" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "f").exists()
    code, err = run_cli(["fuse", str(base), "--every", "2", "-o", str(tmp_path / "f")], capsys)
    assert code == 0, err
