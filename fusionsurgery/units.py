"""Human-readable figures, one spelling for every report (the CLI's tables, verify's memory messages)."""

from __future__ import annotations


def human_bytes(n: int | float) -> str:
    """A byte count in binary units.

    Args:
        n (int | float): bytes.

    Returns:
        str: ``"512 B"``, ``"1.5 KiB"``, ``"3.2 GiB"`` ... (one decimal above bytes, TiB at most).

    Example:
        >>> human_bytes(3 * 1024**3)
        '3.0 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover (the loop returns at TiB)


def human_count(n: int | float) -> str:
    """A count with a decimal suffix.

    Args:
        n (int | float): the count.

    Returns:
        str: ``12_345_678`` -> ``"12.3M"``; below a thousand, the integer itself.

    Example:
        >>> human_count(135_000_000)
        '135.0M'
    """
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))
