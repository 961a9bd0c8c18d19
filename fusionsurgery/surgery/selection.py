"""Which decoder layers get a fusion layer: ``--every N`` or ``--layers 3,7,-1`` / ``3:32:4``."""

from __future__ import annotations

from ..errors import UsageError


def every_n(num_layers: int, n: int) -> list[int]:
    """Layers ``i`` with ``(i + 1) % n == 0`` (torchtune's ``fusion_interval``)."""
    if n <= 0:
        raise UsageError(f"`every` must be a positive integer, got {n}")
    chosen = [i for i in range(num_layers) if (i + 1) % n == 0]
    if not chosen:
        raise UsageError(f"`every` {n} selects no layer of a {num_layers}-layer model")
    return chosen


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Parse a comma list of indices (negative count from the end) and Python-style slices."""
    if not spec or not spec.strip():
        raise UsageError("`layers` is empty; give indices such as 3,7,-1 or a slice such as 3:32:4")
    chosen: list[int] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise UsageError(f"`layers` {spec!r}: empty item")
        if ":" in item:
            chosen.extend(_slice(item, num_layers))
        else:
            chosen.append(_index(item, num_layers))
    seen: set[int] = set()
    for i in chosen:
        if i in seen:
            raise UsageError(f"`layers` {spec!r} selects layer {i} twice")
        seen.add(i)
    if not chosen:
        raise UsageError(f"`layers` {spec!r} selects no layer of a {num_layers}-layer model")
    return sorted(chosen)


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"`layers`: {spec!r} is not an integer or a slice") from None


def _index(item: str, n: int) -> int:
    i = _int(item, item)
    if not -n <= i < n:
        raise UsageError(f"`layers`: layer {i} is out of range for a {n}-layer model (0..{n - 1}, or -{n}..-1)")
    return i % n


def _slice(item: str, n: int) -> list[int]:
    parts = item.split(":")
    if len(parts) > 3:
        raise UsageError(f"`layers`: {item!r} is not a slice (start:stop[:step])")
    start, stop, step = (_int(p, item) if p.strip() else None for p in parts + [""] * (3 - len(parts)))
    if step == 0:
        raise UsageError(f"`layers`: slice {item!r} has step 0")
    for bound in (start, stop):
        if bound is not None and not -n <= bound <= n:
            raise UsageError(f"`layers`: slice {item!r} is out of range for a {n}-layer model")
    picked = list(range(n))[slice(start, stop, step)]
    if not picked:
        raise UsageError(f"`layers`: slice {item!r} selects no layer of a {n}-layer model")
    return picked


def select_layers(num_layers: int, every: int | None, layers: str | None) -> list[int]:
    """Exactly one of ``every`` and ``layers`` must be given."""
    if (every is None) == (layers is None):
        raise UsageError("give exactly one of `every` N and `layers` LIST")
    return every_n(num_layers, every) if every is not None else parse_layers(layers, num_layers)
