"""Fuzzing the parsers: any input gives a result or a clean error, never a crash."""

from __future__ import annotations

import json
import struct

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
