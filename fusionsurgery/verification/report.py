"""Check results and the verification report (what the CLI prints and ``--json`` emits)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CheckFailed

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass
class CheckResult:
    """One check: its status, a one-line summary, details (failures name tensors/layers) and figures."""

    name: str
    title: str
    status: str = PASSED
    summary: str = ""
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # reported, not failed (e.g. trained gates)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def fail(self, detail: str) -> None:
        """Record a failure (the check fails; every detail is kept)."""
        self.status = FAILED
        self.details.append(detail)

    def finish(self, ok_summary: str, failed_summary: str | None = None) -> "CheckResult":
        """Set the summary from the outcome."""
        self.summary = (failed_summary or f"{len(self.details)} problem(s)") if self.failed else ok_summary
        return self


def skipped(name: str, title: str, reason: str) -> CheckResult:
    return CheckResult(name, title, SKIPPED, reason)


@dataclass
class Report:
    """Every check run against one checkpoint."""

    path: str
    base: str | None
    checks: list[CheckResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # device, dtype, stream, memory estimate

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.failed]

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def raise_if_failed(self) -> None:
        """Raise ``CheckFailed`` naming the failed checks, if any.

        Raises:
            CheckFailed: when a check failed (the CLI exits 1).
        """
        if not self.ok:
            names = ", ".join(c.name for c in self.failures)
            raise CheckFailed(f"{self.path}: {len(self.failures)} check(s) failed: {names}")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "base": self.base, "ok": self.ok, "settings": self.settings,
                "checks": [asdict(c) for c in self.checks]}
