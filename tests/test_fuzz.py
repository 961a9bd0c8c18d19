"""Fuzzing the parsers: any input gives a result or a clean error, never a crash."""

from __future__ import annotations

import copy
import json
import shutil
import struct

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionsurgery.errors import CheckpointError, UsageError
from fusionsurgery.io.safetensors_format import DTYPE_SIZES, build_header, parse_header_bytes, read_header
from fusionsurgery.surgery.selection import parse_layers, select_layers

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPE_SIZES, "F128", 3, None]),
    "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 200), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5)


@FAST
@given(raw=st.binary(max_size=512), data_size=st.integers(0, 1024))
def test_header_parser_on_arbitrary_bytes(raw, data_size):
    try:
        tensors, _, _ = parse_header_bytes(raw, data_size, "fuzz")
    except CheckpointError:
        return
    assert sum(t.nbytes for t in tensors.values()) == data_size


@FAST
@given(doc=headers, data_size=st.integers(0, 256))
def test_header_parser_on_structured_json(doc, data_size):
    try:
        tensors, metadata, _ = parse_header_bytes(json.dumps(doc).encode(), data_size, "fuzz")
    except CheckpointError:
        return
    spans = sorted((t.start, t.end) for t in tensors.values())
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(t.nbytes == t.numel * DTYPE_SIZES[t.dtype] for t in tensors.values())


@FAST
@given(doc=headers, tail=st.binary(max_size=300), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_read_header_on_arbitrary_files(tmp_path_factory, doc, tail, length):
    body = json.dumps(doc).encode()
    path = tmp_path_factory.mktemp("fz") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + tail)
    try:
        header = read_header(path)
    except CheckpointError:
        return
    assert header.data_start + sum(t.nbytes for t in header.tensors.values()) == header.file_size


@FAST
@given(names=st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=4),
       dtype=st.sampled_from(sorted(DTYPE_SIZES)), shape=st.lists(st.integers(0, 4), max_size=3))
def test_written_headers_parse_back(names, dtype, shape):
    prefix, offsets = build_header([(n, dtype, tuple(shape)) for n in names])
    size = max((end for _, end in offsets.values()), default=0)
    tensors, _, n = parse_header_bytes(prefix[8:], size, "roundtrip")
    assert set(tensors) == set(names) and (n + 8) % 8 == 0


@FAST
@given(spec=st.text(alphabet="0123456789-:, x", max_size=16), n=st.integers(1, 64))
def test_layer_selection_parser(spec, n):
    try:
        chosen = parse_layers(spec, n)
    except UsageError:
        return
    assert chosen == sorted(set(chosen)) and chosen and all(0 <= i < n for i in chosen)


@FAST
@given(spec=st.text(max_size=12), every=st.one_of(st.none(), st.integers(-5, 70)), n=st.integers(1, 64))
def test_select_layers_any_input(spec, every, n):
    try:
        chosen = select_layers(n, every, spec if every is None else None)
    except UsageError:
        return
    assert chosen and all(0 <= i < n for i in chosen)


# ---------------------------------------------------------------- manifests and fusion sections
@pytest.fixture(scope="module")
def fused_docs(tmp_path_factory):
    """A tiny fused checkpoint and an adapter of it, for mutating their manifests and configs."""
    import fusionsurgery as fs
    from helpers import make_base

    root = tmp_path_factory.mktemp("fuzzdocs")
    base = make_base(root, "llama")[0]
    fs.fuse(base, root / "fused", layers="0,2")
    fs.fuse(base, root / "adapter", layers="1", adapter_only=True)
    return base, root


def _paths(doc, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document, the document itself included."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in list(items)[:12]:
        yield from _paths(v, (*prefix, k))


def _replace(doc, path, value):
    if not path:
        return value
    doc = copy.deepcopy(doc)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.sampled_from(["fused/fusion_manifest.json", "adapter/fusion_manifest.json",
                                               "fused/config.json", "adapter/config.json"]))
def test_mutated_manifests_and_configs_give_a_result_or_a_clean_error(fused_docs, tmp_path_factory, data, which):
    """Any one field of a manifest or config replaced by any JSON value: every reader (inspect,
    verify's header-level checks, unfuse's and export's opening, an adapter's base check) answers
    or raises a one-line FusionSurgeryError, never another exception."""
    from fusionsurgery.errors import FusionSurgeryError
    from fusionsurgery.exporting.common import open_source
    from fusionsurgery.inspection import inspect_checkpoint
    from fusionsurgery.io.checkpoint import Checkpoint
    from fusionsurgery.surgery.adapter import attach_base
    from fusionsurgery.verification import originals, structure

    base, root = fused_docs
    kind, name = which.split("/")
    d = tmp_path_factory.mktemp("mut") / kind
    shutil.copytree(root / kind, d)
    doc = json.loads((d / name).read_text())
    path = data.draw(st.sampled_from(list(_paths(doc))))
    (d / name).write_text(json.dumps(_replace(doc, path, data.draw(json_values)), allow_nan=True))
    readers = [
        lambda: inspect_checkpoint(d, base=base if kind == "adapter" else None),
        lambda: open_source(d, base=base if kind == "adapter" else None),
    ]
    if kind == "adapter":
        readers.append(lambda: attach_base(Checkpoint.open(d), Checkpoint.open(base)))
    else:
        def header_checks():
            ckpt = Checkpoint.open(d)
            check, layout = structure.check_structure(ckpt)
            originals.check_originals(ckpt, layout)
        readers.append(header_checks)
    for read in readers:
        try:
            read()
        except FusionSurgeryError as exc:
            assert "\n" not in str(exc)
