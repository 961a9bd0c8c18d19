"""Optional dependencies: check the installed release against the oldest one the project is tested with.

An extra's packages are imported only by the parts that need them (``fusionsurgery.hf`` needs
transformers); before importing them, those parts call :func:`require` so that a missing or too-old
release gives one line naming the release needed and the command that installs it, instead of an
``AttributeError`` deep inside the first call that meets a missing API.
"""

from __future__ import annotations

import re
from importlib import import_module, metadata
from typing import NamedTuple

#: Floors of the ``[hf]`` extra: the oldest releases the whole test suite passes with
#: (``scripts/check_versions.sh``). They must equal pyproject.toml's; ``tests/test_versions.py`` checks it.
HF_FLOORS: dict[str, str] = {"transformers": "5.0.0", "accelerate": "1.3.0"}


class TypeFloor(NamedTuple):
    """The oldest transformers release through which a model type works in ``fusionsurgery.hf``, and why."""

    release: str
    reason: str


#: Model types that need a newer transformers than :data:`HF_FLOORS` through ``fusionsurgery.hf`` (and ``verify``'s
#: transformers engine): the oldest release whose tiny model of the type passes the any-decoder suites
#: (``tests/test_any_decoder_*.py``; bisected over the registry's releases, 2026-11-30), and what fails before it.
#: ``fusionsurgery.hf`` refuses such a type below its release; the suite skips it there (``tests/any_decoder.py``).
TRANSFORMERS_FOR_TYPE: dict[str, TypeFloor] = {
    "apertus": TypeFloor("5.1.0", "transformers 5.0.0 cannot load an Apertus checkpoint at all: its xIELU "
                                  "activation is built on the meta device"),
    "recurrent_gemma": TypeFloor("5.4.0", "before 5.4.0 transformers leaves RecurrentGemma's rotary buffers "
                                          "uninitialised when it loads a checkpoint: the base's own logits change "
                                          "from one load to the next"),
    "falcon_h1": TypeFloor("5.5.0", "before 5.4.0 a Falcon-H1 forward with use_cache=True returns no cache "
                                    "(verify's cached-decoding check fails), and 5.4.0 refuses its own config "
                                    "(use_cache typed as an int)"),
    "jamba": TypeFloor("5.2.0", "before 5.2.0 transformers' Jamba refuses to build on a CPU with use_mamba_kernels "
                                "left at its default (\"Fast Mamba kernels are not available\"; 5.1.0 fails, 5.2.0 runs)"),
    "gemma3": TypeFloor("5.6.0", "before 5.6.0 transformers neither reverts Gemma 3's key conversions (the fusion "
                                 "blocks are found by the name the layers are saved under) nor saves its tied head "
                                 "as it loads it (5.5.4 fails, 5.6.2 runs)"),
    "llama4": TypeFloor("5.8.0", "before 5.8.0 Llama 4's composite config has no top-level pad_token_id, which "
                                 "its model reads as it is built (5.7.0 fails, 5.8.1 runs)"),
    "cpmant": TypeFloor("5.16.0", "before 5.16.0 CPM-Ant's cached generation adds a position bias of the wrong "
                                  "length (a RuntimeError inside transformers' CpmAnt attention)"),
}


def type_floor_problem(model_type: str, installed: str | None = None) -> str | None:
    """Why ``model_type`` cannot run through the installed transformers, per :data:`TRANSFORMERS_FOR_TYPE`; else None.

    Args:
        model_type: a config.json's ``model_type``.
        installed: the transformers version to judge (default: the installed one).

    Returns:
        One line naming the type, the installed and the needed release, what fails and how to upgrade;
        None when the type has no floor of its own, the release is new enough, or transformers is missing
        (the import of ``fusionsurgery.hf`` says that).
    """
    floor = TRANSFORMERS_FOR_TYPE.get(model_type)
    found = installed if installed is not None else installed_version("transformers")
    if floor is None or found is None:
        return None
    try:
        if release(found) >= release(floor.release):
            return None
    except ValueError:  # an unparseable version (a source checkout): let it run
        return None
    return (f"model type {model_type!r} needs transformers >= {floor.release} ({found} is installed: "
            f"{floor.reason}): pip install -U \"transformers>={floor.release}\"")


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
