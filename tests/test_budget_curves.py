"""The budget curves' reading: factors compared point by point along their training budget."""

from __future__ import annotations

from components.budget_curves import ranking_changes, standings
from components.sweep_summary import BudgetPoint, FactorRow


def row(factor: int, *seeds: list[float], minutes: float = 1.5) -> FactorRow:
    """A factor with one curve per seed: KIDs at equal shares of a ``minutes`` budget."""

    def curve(kids: list[float]) -> list[BudgetPoint]:
        n = len(kids)
        return [
            BudgetPoint(10 * (k + 1), minutes * 60 * (k + 1) / n, kid, kid - 0.005, kid + 0.005)
            for k, kid in enumerate(kids)
        ]

    first, *rest = (FactorRow(factor, budget_curve=curve(kids)) for kids in seeds)
    first.repeats = rest
    return first


def test_the_leader_at_each_point_and_where_the_ranking_changes():
    rows = [
        row(4, [0.30, 0.10, 0.040], [0.31, 0.11, 0.042]),  # slow start, best at the end
        row(16, [0.12, 0.09, 0.080], [0.13, 0.10, 0.082]),  # fast start, stalls
    ]
    found = standings(rows)
    assert [s.k for s in found] == [1, 2, 3] and [s.leader for s in found] == [16, 16, 4]
    assert [round(s.train_s) for s in found] == [30, 60, 90]
    assert found[0].comparison.training_noise_measured  # two seeds per factor at every point
    text = ranking_changes(found)
    assert "f=16 at 1/3 of the budget (0.5 min" in text and "f=4 at the end (1.5 min" in text
    assert "The ranking changes: f=4 takes the lead from f=16 between 1 and 1.5 min." in text


def test_a_lead_that_holds_is_said_once_and_curves_of_unequal_length_compare_their_common_points():
    rows = [row(8, [0.10, 0.05, 0.03]), row(32, [0.20, 0.15])]  # f=32's curve stopped early
    found = standings(rows)
    assert [s.leader for s in found] == [8, 8]
    assert "The lead does not change along the budget: f=8 at every point." in ranking_changes(found)


def test_no_curve_to_compare_says_so():
    assert standings([row(8, [0.1, 0.05]), FactorRow(16)]) == []
    assert ranking_changes([]) == "Budget curves: fewer than two factors recorded KID during training."
