"""Compare two reports (A = baseline, B = candidate) metric by metric.

A metric regresses when it has a preferred direction, a tolerance (config `tolerances`,
defaults in `services.eval.config.DEFAULT_TOLERANCES`), and B is worse than A by more than
the tolerance: allowed = max(abs, rel * |A|) over the limits given. A gated metric that has a
value in A but none in B (unavailable / missing everywhere) is a regression too ("lost"):
a broken metric must not pass a gate silently. Metrics without a tolerance are shown, never
gating. Different benchmarks (sha256) are compared but flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import Tolerance


@dataclass
class Row:
    key: str
    title: str
    a: float | None
    b: float | None
    higher_is_better: bool | None
    tolerance: Tolerance | None
    verdict: str  # "regression" | "lost" | "improved" | "ok" | "n/a"

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def rel(self) -> float | None:
        d = self.delta
        return None if d is None or not self.a else d / abs(self.a)


@dataclass
class Comparison:
    rows: list[Row]
    warnings: list[str]

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict in ("regression", "lost")]


def _verdict(a: float | None, b: float | None, hib: bool | None, tol: Tolerance | None) -> str:
    if a is None and b is None:
        return "n/a"
    if tol is not None and hib is not None and a is not None and b is None:
        return "lost"
    if a is None or b is None or hib is None:
        return "n/a"
    worse = (a - b) if hib else (b - a)
    if tol is not None:
        allowed = max(tol.abs or 0.0, (tol.rel or 0.0) * abs(a))
        if worse > allowed + 1e-12:
            return "regression"
    if worse < 0:
        return "improved"
    return "ok"


def compare_reports(a: dict[str, Any], b: dict[str, Any], tolerances: dict[str, Tolerance]) -> Comparison:
    warnings = []
    ba, bb = a.get("benchmark", {}), b.get("benchmark", {})
    if ba.get("sha256") != bb.get("sha256"):
        warnings.append(
            f"different benchmarks: A {ba.get('name')} ({str(ba.get('sha256'))[:12]}) vs "
            f"B {bb.get('name')} ({str(bb.get('sha256'))[:12]})"
        )
    for side, rep in (("A", a), ("B", b)):
        failed = rep.get("benchmark", {}).get("failed", 0)
        if failed:
            warnings.append(f"{side} has {failed} failed samples")
    ma, mb = a.get("metrics", {}), b.get("metrics", {})
    keys = list(ma) + [k for k in mb if k not in ma]
    rows = []
    for k in keys:
        info = ma.get(k) or mb.get(k)
        va = (ma.get(k) or {}).get("value")
        vb = (mb.get(k) or {}).get("value")
        tol = tolerances.get(k)
        rows.append(
            Row(
                k,
                info.get("title", k),
                va,
                vb,
                info.get("higher_is_better"),
                tol,
                _verdict(va, vb, info.get("higher_is_better"), tol),
            )
        )
    return Comparison(rows, warnings)


def _f(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "—"
    if not math.isfinite(v):
        return str(v)
    return f"{v:+.{digits}f}" if digits < 0 else f"{v:.{digits}f}"


def _tol(t: Tolerance | None) -> str:
    if t is None:
        return ""
    parts = ([f"{t.abs:g}"] if t.abs is not None else []) + ([f"{t.rel * 100:g}%"] if t.rel is not None else [])
    return "/".join(parts)


def format_table(c: Comparison, label_a: str = "A", label_b: str = "B") -> str:
    head = ["metric", label_a, label_b, "delta", "rel", "gate", "verdict"]
    body = []
    for r in c.rows:
        arrow = "↑" if r.higher_is_better else "↓" if r.higher_is_better is False else " "
        rel = "—" if r.rel is None else f"{r.rel * 100:+.1f}%"
        delta = "—" if r.delta is None else f"{r.delta:+.4f}"
        verdict = r.verdict.upper() if r.verdict in ("regression", "lost") else r.verdict
        body.append([f"{r.key} {arrow}", _f(r.a), _f(r.b), delta, rel, _tol(r.tolerance), verdict])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells: list) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(head), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    out += [f"warning: {w}" for w in c.warnings]
    n = len(c.regressions)
    out.append(f"{n} regression{'s' if n != 1 else ''}" + (": " + ", ".join(r.key for r in c.regressions) if n else ""))
    return "\n".join(out)
