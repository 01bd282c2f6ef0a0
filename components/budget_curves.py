"""Budget curves (the paper's Figure 6): each factor's KID against its LDM's training time, and
where along the budget the ranking of the factors changes.

Every LDM is scored at equal shares of its training budget (``ldm.budget_points``; the last at
the end), on ``ldm.budget_samples`` samples: KID with its bootstrap interval, and the training
seconds so far (``mlflow_callbacks.BudgetCurve``; read back as ``sweep_summary.BudgetPoint``).
Under an equal-time budget the k-th point of every factor lies at the same training time, so the
factors are compared point by point, on every seed's KID, as the verdict compares them at the end
(``components.comparison``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from statistics import fmean, median
from typing import TYPE_CHECKING

from components.comparison import Comparison, compare

if TYPE_CHECKING:  # (only names for annotations: the report's import chain stays short)
    from components.sweep_summary import FactorRow


@dataclass(frozen=True)
class Standing:
    """The factors compared at the k-th point of their budget curves (k from 1)."""

    k: int
    points: int  # of the curves' points (the last is the end of training)
    train_s: float  # median training seconds at this point, over the models compared
    train_s_of: dict[int, float]  # per factor, the mean over its models (equal under a time budget)
    comparison: Comparison

    @property
    def leader(self) -> int:
        p = self.comparison.p_best
        return max(p, key=lambda f: (p[f], -self.comparison.estimate[f]))

    @property
    def share(self) -> str:
        return "the end" if self.k == self.points else f"{Fraction(self.k, self.points)} of the budget"


def standings(rows: list[FactorRow], confidence: float = 0.95) -> list[Standing]:
    """The comparison at each point every factor's curves have, in order along the budget."""
    curves = {r.factor: [s.budget_curve for s in r.all_seeds if s.budget_curve] for r in rows}
    curves = {f: c for f, c in curves.items() if c}
    if len(curves) < 2:
        return []
    points = max(len(c) for seeds in curves.values() for c in seeds)
    out = []
    for k in range(points):
        at_k = {f: [c[k] for c in seeds if len(c) > k] for f, seeds in curves.items()}
        if not all(at_k.values()):
            break  # (a factor whose curve stops early: later points would compare fewer factors)
        comparison = compare(
            {f: [p.kid for p in ps] for f, ps in at_k.items()},
            evaluation_intervals={f: [(p.low, p.high) for p in ps if p.low is not None] for f, ps in at_k.items()},
            confidence=confidence,
        )
        train_s = median(p.train_s for ps in at_k.values() for p in ps)
        of = {f: fmean(p.train_s for p in ps) for f, ps in at_k.items()}
        out.append(Standing(k + 1, points, train_s, of, comparison))
    return out


def ranking_changes(found: list[Standing]) -> str:
    """One sentence: which factor leads at each point, and where the lead changes."""
    if not found:
        return "Budget curves: fewer than two factors recorded KID during training."
    at = [
        f"f={s.leader} at {s.share} ({s.train_s / 60:.2g} min, P(best) {s.comparison.p_best[s.leader]:.2f})"
        for s in found
    ]
    leaders = [s.leader for s in found]
    changes = [
        f"f={b.leader} takes the lead from f={a.leader} between {a.train_s / 60:.2g} and {b.train_s / 60:.2g} min"
        for a, b in zip(found, found[1:], strict=False)
        if a.leader != b.leader
    ]
    head = f"Budget curves (KID during training, {len(found)} points): the most likely best is " + "; ".join(at) + "."
    if len(set(leaders)) == 1:
        return head + f" The lead does not change along the budget: f={leaders[0]} at every point."
    return head + " The ranking changes: " + "; ".join(changes) + "."
