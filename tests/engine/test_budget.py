"""The per-task error budget across modules (engine/subspace/budget.py) against a brute-force search."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from engine.subspace.budget import Group, allocate, task_errors


def _random_groups(rng: random.Random, n_groups: int, n_tasks: int, n_cands: int, shared: bool) -> list[Group]:
    groups = []
    for g in range(n_groups):
        tasks = list(range(n_tasks)) if shared or g % 2 == 0 else [g % n_tasks]
        weights = [rng.uniform(0.2, 3.0) for _ in tasks]
        cands = sorted((rng.randint(10, 400), [rng.uniform(0.0, 0.12) for _ in tasks]) for _ in range(n_cands))
        groups.append(Group(tasks, weights, [b for b, _ in cands], [e for _, e in cands]))
    return groups


def _brute(groups: list[Group], n_tasks: int, mean: float, mx: float | None) -> int | None:
    """Fewest bytes over every combination meeting both rules, computed from the definition."""
    best = None
    for combo in itertools.product(*(range(len(g.nbytes)) for g in groups)):
        num, den = [0.0] * n_tasks, [0.0] * n_tasks
        ok = True
        for g, c in zip(groups, combo):
            for t, w, e in zip(g.tasks, g.weights, g.errors[c]):
                num[t] += w * e * e
                den[t] += w
                ok &= mx is None or e <= mx + 1e-12
        ok &= all(math.sqrt(n / d) <= mean * (1 + 1e-9) + 1e-12 for n, d in zip(num, den) if d > 0)
        if ok:
            cost = sum(g.nbytes[c] for g, c in zip(groups, combo))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_allocation_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n_groups, n_tasks = rng.choice([2, 3]), 3
    groups = _random_groups(rng, n_groups, n_tasks, rng.choice([2, 3, 4]), shared=seed % 2 == 0)
    mean = rng.uniform(0.03, 0.09)
    mx = rng.choice([None, 0.1])
    want = _brute(groups, n_tasks, mean, mx)
    got = allocate(groups, n_tasks, mean, mx)
    if want is None:
        assert not got.met
        return
    assert got.met and got.exact and got.nbytes == want
    assert all(e <= mean * (1 + 1e-9) + 1e-12 for e in task_errors(groups, got.choice, n_tasks))


@pytest.mark.parametrize("seed", range(20))
def test_greedy_meets_every_budget_and_is_close(seed: int) -> None:
    rng = random.Random(100 + seed)
    groups = _random_groups(rng, 3, 3, 4, shared=seed % 2 == 0)
    # the most precise candidate (zero error) in every group: the greedy's start always meets the budget
    for g in groups:
        g.nbytes.append(500)
        g.errors.append([0.0] * len(g.tasks))
    mean = rng.uniform(0.03, 0.09)
    got = allocate(groups, 3, mean, None, exact_limit=0)
    want = _brute(groups, 3, mean, None)
    assert got.met and not got.exact
    assert all(e <= mean * (1 + 1e-9) + 1e-12 for e in got.task_errors)
    assert want is not None and want <= got.nbytes <= sum(max(g.nbytes) for g in groups)
    # one task, one group each, candidates on a convex frontier: the greedy is optimal
    conv = [Group([0], [1.0], [400, 200, 100, 50], [[0.0], [0.02], [0.05], [0.09]]),
            Group([0], [1.0], [400, 250, 150], [[0.0], [0.01], [0.03]])]
    assert allocate(conv, 1, 0.04, exact_limit=0).nbytes == _brute(conv, 1, 0.04, None)


def test_max_error_holds_per_candidate_and_unmet_is_reported() -> None:
    g = Group([0, 1], [1.0, 1.0], [100, 10], [[0.01, 0.01], [0.2, 0.0]])
    assert allocate([g], 2, 0.5, 0.1).choice == [0]  # the cheap one breaks max_error
    assert allocate([g], 2, 0.5).choice == [1]
    bad = allocate([Group([0], [1.0], [10], [[0.3]])], 1, 0.05)
    assert not bad.met and bad.task_errors == [pytest.approx(0.3)]


def test_bad_group_is_refused() -> None:
    with pytest.raises(ValueError, match="one weight per task"):
        Group([0, 1], [1.0], [1], [[0.0, 0.0]])
