"""``--batch add``: in place only with --force, every task's error before → after, refusal of a broken target; quantize warns."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from batchutil import leftovers, run_batch


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tight(tmp_path_factory, peft_family_dirs) -> Path:
    """A subspace of the first family (three PEFT adapters) with a tight target: max error 0.01, float32."""
    out = tmp_path_factory.mktemp("tight") / "sub"
    r = run_batch("compress", *peft_family_dirs[:3], "-o", out, "--max-error", "0.01", "--dtype", "float32", "-q")
    assert r.rc == 0, r.stderr
    return out


def test_in_place_needs_force(tight, peft_family_dirs):
    before = _digest(tight)
    r = run_batch("add", tight, peft_family_dirs[3], "--task-id", "x")
    assert r.rc == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _digest(tight) == before


def test_absorb_reports_every_task_and_keeps_the_target(tmp_path, tight, peft_family_dirs):
    import torch

    from engine.io.local import load_adapter
    from engine.subspace import SharedSubspace

    out = tmp_path / "absorbed"
    r = run_batch("add", tight, peft_family_dirs[3], "--task-id", "newcomer", "-o", out, "--json")
    assert r.rc == 0, r.stderr
    d = r.json()["data"]
    assert d["target"]["rule"] == "max_error" and d["target"]["max_error"] == 0.01
    rows = {t["task_id"]: t for t in d["tasks"]}
    names = [p.name for p in peft_family_dirs[:3]]
    assert list(rows) == [*names, "newcomer"] and rows["newcomer"]["before"] is None
    for n in names:
        assert rows[n]["before"] is not None and rows[n]["after"]["max"] >= rows[n]["before"]["max"] - 1e-9
    sub = SharedSubspace.load(out)
    for i, n in enumerate([*names, "newcomer"]):  # measured independently: original ΔW vs the reconstruction
        orig = load_adapter(peft_family_dirs[i if n != "newcomer" else 3])
        rec = sub.reconstruct(n, pad_to_vllm=False)
        for m in orig.layer_names:
            dw = orig.delta_weight(m).double()
            err = float((dw - rec.delta_weight(m).double()).norm() / dw.norm())
            assert err <= 0.01 + 1e-5
            assert err <= sub.tasks[n].fidelity[m] + 1e-5
    text = run_batch("add", tight, peft_family_dirs[4], "--task-id", "other", "-o", tmp_path / "t")
    assert text.rc == 0, text.stderr
    assert "before → after" in text.stdout and "max_error 0.01" in text.stdout and "(new)" in text.stdout
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def demo_sql(tmp_path_factory, demo_dir) -> Path:
    """A subspace of the demo's three sql adapters, max error 0.01."""
    out = tmp_path_factory.mktemp("sql") / "sub"
    r = run_batch("compress", *[demo_dir / f"sql-{n}" for n in ("bigquery", "duckdb", "postgres")], "-o", out,
                  "--max-error", "0.01", "-q")
    assert r.rc == 0, r.stderr
    return out


def test_a_break_is_refused_unless_allowed(tmp_path, demo_sql, demo_dir):
    before = _digest(demo_sql)
    alien = demo_dir / "pirate-speak"  # another family, projected onto fixed bases: far beyond max error 0.01
    r = run_batch("add", demo_sql, alien, "--task-id", "alien", "--project", "--force")
    assert r.rc == 1, r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "would break" in line[0] and "alien" in line[0] and "--allow-worse" in line[0]
    assert _digest(demo_sql) == before
    out = tmp_path / "worse"
    ok = run_batch("add", demo_sql, alien, "--task-id", "alien", "--project", "--allow-worse", "-o", out, "--json")
    assert ok.rc == 0, ok.stderr
    assert ok.stderr.count("warning:") == 1 and "alien" in ok.stderr
    rows = {t["task_id"]: t for t in ok.json()["data"]["tasks"]}
    assert rows["alien"]["breaks_target"] and rows["alien"]["after"]["max"] > 0.01
    assert _digest(demo_sql) == before
    # absorb keeps the target for the same adapter: every task within it, nothing refused
    ab = run_batch("add", demo_sql, alien, "--task-id", "alien", "-o", tmp_path / "absorbed", "--json")
    assert ab.rc == 0, ab.stderr
    assert all(t["after"]["max"] <= 0.01 + 2e-3 and not t["breaks_target"] for t in ab.json()["data"]["tasks"])


def test_quantize_warns_when_it_breaks_the_target(tmp_path, tight):
    r = run_batch("quantize", tight, "-o", tmp_path / "q", "--bits", "4", "--method", "nf4")
    assert r.rc == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "breaks the subspace's error target (max_error 0.01)" in warn[0]
    assert "→" in warn[0] and "max_error 0.01" in r.stdout
    j = run_batch("quantize", tight, "-o", tmp_path / "q2", "--bits", "4", "--method", "nf4", "--json")
    d = j.json()["data"]
    assert d["warnings"] and d["after"]["max_error"] > 0.01 >= d["before"]["max_error"] - 1e-6
