"""A per-task error budget spent across modules: the fewest bytes whose every task meets ``mean_error``.

``mean_error`` is met *per task over its modules*, weighted by ‖ΔW_{i,m}‖²: task
i's overall error is the relative Frobenius error of its whole update,

    E_i = sqrt( Σ_m e²_{i,m}·‖ΔW_{i,m}‖² / Σ_m ‖ΔW_{i,m}‖² ),

the same relative error every other figure reports, taken over all its modules at
once. A *group* is one choice to make (a module stored per task: one task's
candidates; a shared module: candidates touching every task), each candidate its
bytes and per task its relative error. :func:`allocate` picks one candidate per
group: the fewest bytes such that every task's ``E_i ≤ mean_error`` and, with
``max_error``, every candidate error ``≤ max_error``. Small cases are solved
exactly (every combination); otherwise greedily: start from each group's most
precise candidate and repeatedly take the step (one group to a cheaper candidate)
saving the most bytes per unit of weighted squared error added (each task's
error counted as a share of its budget), while every task's budget holds; a
second greedy run starts from each group's cheapest candidate within
``mean_error`` for every task (what ``max_error = mean_error`` stores), and the
cheaper result is kept, so a mean target never stores more than a max target.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

#: Combinations up to which :func:`allocate` searches them all.
EXACT_LIMIT = 4096
_TOL = 1e-12


@dataclass
class Group:
    """One choice: candidates with their bytes and each touched task's relative error.

    Attributes:
        tasks: Task indices the group touches.
        weights: Per touched task, ‖ΔW‖² of the module (the weight of its error).
        nbytes: Per candidate, bytes stored.
        errors: Per candidate, per touched task (in ``tasks`` order), the relative error.
    """

    tasks: list[int]
    weights: list[float]
    nbytes: list[int]
    errors: list[list[float]]

    def __post_init__(self) -> None:
        if len(self.tasks) != len(self.weights):
            raise ValueError(f"a group needs one weight per task: {len(self.tasks)} tasks, {len(self.weights)} weights")
        if not self.nbytes or len(self.nbytes) != len(self.errors):
            raise ValueError(f"a group needs one or more candidates with errors each: {len(self.nbytes)} bytes, "
                             f"{len(self.errors)} error rows")
        if any(len(e) != len(self.tasks) for e in self.errors):
            raise ValueError("every candidate needs one error per task of its group")

    def sq(self, c: int) -> list[float]:
        """Candidate ``c``'s weighted squared error per touched task."""
        return [w * e * e for w, e in zip(self.weights, self.errors[c])]


@dataclass
class Allocation:
    """The chosen candidate per group, and each task's overall error under it.

    Attributes:
        choice: Per group, the index of its chosen candidate.
        task_errors: Per task, ``E_i`` (the relative error over all its modules).
        nbytes: Bytes of the chosen candidates.
        met: Whether every task meets the targets (the most precise candidates may not).
    """

    choice: list[int]
    task_errors: list[float]
    nbytes: int
    met: bool = True
    exact: bool = False
    steps: int = 0
    meta: dict[str, float] = field(default_factory=dict)


def task_errors(groups: list[Group], choice: list[int], n_tasks: int) -> list[float]:
    """``E_i`` per task under ``choice`` (0 for a task of no weight)."""
    num, den = [0.0] * n_tasks, [0.0] * n_tasks
    for g, c in zip(groups, choice):
        for t, w, s in zip(g.tasks, g.weights, g.sq(c)):
            num[t] += s
            den[t] += w
    return [math.sqrt(num[t] / den[t]) if den[t] > 0 else 0.0 for t in range(n_tasks)]


def _allowed(g: Group, max_error: float | None) -> list[int]:
    """Candidates within ``max_error`` (all without one); none within: the one of least worst error."""
    if max_error is None:
        return list(range(len(g.nbytes)))
    ok = [c for c in range(len(g.nbytes)) if all(e <= max_error + _TOL for e in g.errors[c])]
    return ok or [min(range(len(g.nbytes)), key=lambda c: (max(g.errors[c], default=0.0), g.nbytes[c]))]


def allocate(groups: list[Group], n_tasks: int, mean_error: float, max_error: float | None = None, *,
             exact_limit: int = EXACT_LIMIT) -> Allocation:
    """One candidate per group: the fewest bytes with every task's ``E_i ≤ mean_error`` (and errors ``≤ max_error``).

    Exact (every combination) when there are at most ``exact_limit`` of them, else greedy
    (see the module docstring). When no choice meets the targets (``met`` False), the most
    precise candidates, made cheaper only where that breaks no task further.
    """
    allowed = [_allowed(g, max_error) for g in groups]
    den = [0.0] * n_tasks
    for g in groups:
        for t, w in zip(g.tasks, g.weights):
            den[t] += w
    budget = [mean_error * mean_error * d * (1 + 1e-9) + 1e-300 for d in den]
    if math.prod(len(a) for a in allowed) <= exact_limit:
        return _exact(groups, allowed, n_tasks, budget, mean_error)
    best = _greedy(groups, allowed, n_tasks, budget, mean_error)
    # a second start: each group's cheapest candidate within mean_error for every task (what max_error = mean_error
    # would store; it meets every budget), so the result is never more bytes than that
    per = [[c for c in a if all(e <= mean_error + _TOL for e in g.errors[c])] for g, a in zip(groups, allowed)]
    if all(per):
        start = [min(c, key=lambda i, g=g: (g.nbytes[i], sum(g.sq(i)))) for g, c in zip(groups, per)]
        other = _greedy(groups, allowed, n_tasks, budget, mean_error, start)
        if other.met and (not best.met or other.nbytes < best.nbytes):
            best = other
    return best


def _finish(groups: list[Group], choice: list[int], n_tasks: int, mean_error: float, **kw: object) -> Allocation:
    errs = task_errors(groups, choice, n_tasks)
    return Allocation(choice, errs, sum(g.nbytes[c] for g, c in zip(groups, choice)),
                      met=all(e <= mean_error * (1 + 1e-9) + _TOL for e in errs), **kw)  # type: ignore[arg-type]


def _exact(groups: list[Group], allowed: list[list[int]], n_tasks: int, budget: list[float],
           mean_error: float) -> Allocation:
    best: tuple[int, float] | None = None
    pick: list[int] = []
    for combo in itertools.product(*allowed):
        used = [0.0] * n_tasks
        for g, c in zip(groups, combo):
            for t, s in zip(g.tasks, g.sq(c)):
                used[t] += s
        if any(u > b for u, b in zip(used, budget)):
            continue
        key = (sum(g.nbytes[c] for g, c in zip(groups, combo)), sum(u / b for u, b in zip(used, budget)))
        if best is None or key < best:
            best, pick = key, list(combo)
    if best is None:  # nothing meets it: the greedy's best effort from the most precise
        return _greedy(groups, allowed, n_tasks, budget, mean_error)
    return _finish(groups, pick, n_tasks, mean_error, exact=True)


def _greedy(groups: list[Group], allowed: list[list[int]], n_tasks: int, budget: list[float],
            mean_error: float, start: list[int] | None = None) -> Allocation:
    # start: each group's most precise candidate (least budget used; ties: fewer bytes)
    choice = list(start) if start is not None else [
        min(a, key=lambda c, g=g: (sum(s / budget[t] for t, s in zip(g.tasks, g.sq(c))), g.nbytes[c]))
        for g, a in zip(groups, allowed)]
    used = [0.0] * n_tasks
    for g, c in zip(groups, choice):
        for t, s in zip(g.tasks, g.sq(c)):
            used[t] += s
    limit = [max(b, u) for b, u in zip(budget, used)]  # a task over budget from the start may not get worse
    version = [0] * len(groups)

    def steps(gi: int) -> list[tuple[float, int, int, int]]:
        """The group's cheaper candidates as heap entries ``(-ratio, -bytes saved, group, candidate)``."""
        g, cur = groups[gi], choice[gi]
        base = g.sq(cur)
        out = []
        for c in allowed[gi]:
            saved = g.nbytes[cur] - g.nbytes[c]
            if saved <= 0:
                continue
            cost = sum(max(0.0, s - s0) / budget[t] for t, s, s0 in zip(g.tasks, g.sq(c), base))
            out.append((-(saved / cost if cost > 0 else math.inf), -saved, gi, c))
        return out

    n_steps = 0
    progress = True
    while progress:  # a sweep after the heap empties: a step that lowered a task's use may free another
        progress = False
        heap = [(*e, version[e[2]]) for gi in range(len(groups)) for e in steps(gi)]
        heapq.heapify(heap)
        while heap:
            _, _, gi, c, ver = heapq.heappop(heap)
            if ver != version[gi]:
                continue
            g = groups[gi]
            new, old = g.sq(c), g.sq(choice[gi])
            if any(used[t] - s0 + s > limit[t] for t, s, s0 in zip(g.tasks, new, old)):
                continue  # budgets only fill up: this step stays out (the next sweep looks again)
            for t, s, s0 in zip(g.tasks, new, old):
                used[t] += s - s0
            choice[gi] = c
            version[gi] += 1
            n_steps += 1
            progress = True
            for e in steps(gi):
                heapq.heappush(heap, (*e, version[gi]))
    return _finish(groups, choice, n_tasks, mean_error, steps=n_steps)
