"""Optional dependencies: check the installed release against the oldest one the project is tested with.

An extra's packages are imported only by the parts that need them (``fusionsurgery.hf`` needs
transformers); before importing them, those parts call :func:`require` so that a missing or too-old
release gives one line naming the release needed and the command that installs it, instead of an
``AttributeError`` deep inside the first call that meets a missing API.
"""

from __future__ import annotations

import re
from importlib import import_module, metadata

#: Floors of the ``[hf]`` extra: the oldest releases the whole test suite passes with
#: (``scripts/check_versions.sh``). They must equal pyproject.toml's; ``tests/test_versions.py`` checks it.
HF_FLOORS: dict[str, str] = {"transformers": "5.0.0", "accelerate": "1.3.0"}


class MissingDependencyError(ImportError):
    """An optional dependency is missing or older than the project's floor (the message is one line)."""


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string: ``"5.0.0rc1"`` -> ``(5, 0, 0)``, padded to three numbers.

    Args:
        version: a version string as a package reports it.

    Returns:
        The leading dot-separated integers (pre-, post- and dev-release and local parts are ignored,
        so a development build of the floor counts as the floor).

    Raises:
        ValueError: ``version`` does not start with a number.
    """
    match = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("vV"))
    if match is None:
        raise ValueError(f"not a version number: {version!r}")
    parts = tuple(int(p) for p in match.group(0).split("."))
    return parts + (0,) * (3 - len(parts))


def installed_version(package: str) -> str | None:
    """The installed release of ``package``, or None when it is not installed.

    Args:
        package: a distribution name that is also its import name (``transformers``, ``accelerate``).

    Returns:
        The version from the distribution's metadata; for a copy without metadata (a source tree on
        ``sys.path``), the module's ``__version__``; None when neither exists.
    """
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        pass
    try:
        module = import_module(package)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "")) or None


def require(package: str, floor: str, *, extra: str, user: str, optional: bool = False) -> None:
    """Refuse, in one line, a missing or too-old ``package``.

    Args:
        package: the distribution name (``transformers``).
        floor: the oldest release that works (``"5.0.0"``).
        extra: the fusionsurgery extra that installs it (``"hf"``), named in the message.
        user: what needs it (``"fusionsurgery.hf"``), named in the message.
        optional: when True, a missing ``package`` is accepted (only a too-old one is refused).

    Raises:
        MissingDependencyError: ``package`` is not installed (and not ``optional``), or is older than ``floor``.
    """
    found = installed_version(package)
    if found is None and optional:
        return
    try:
        too_old = found is not None and release(found) < release(floor)
    except ValueError:  # an unparseable version (a vendored copy): let the import decide
        too_old = False
    if found is None or too_old:
        state = "it is not installed" if found is None else f"{found} is installed"
        raise MissingDependencyError(
            f"{user} needs {package} >= {floor} ({state}): pip install \"fusionsurgery[{extra}]\" "
            f"(from a clone: pip install -e \".[{extra}]\"), or pip install \"{package}>={floor}\"")


def require_hf() -> None:
    """Check the ``[hf]`` extra: transformers (needed) and accelerate (optional, but never older than its floor:
    transformers 5.0 imports ``get_module_size_with_ties`` (accelerate 1.2) whenever accelerate is installed, and its
    ``Trainer`` calls ``unwrap_model(keep_torch_compile=...)`` (accelerate 1.3)).

    Raises:
        MissingDependencyError: transformers is missing or too old, or accelerate is too old.
    """
    require("transformers", HF_FLOORS["transformers"], extra="hf", user="fusionsurgery.hf")
    require("accelerate", HF_FLOORS["accelerate"], extra="hf", user="fusionsurgery.hf", optional=True)
