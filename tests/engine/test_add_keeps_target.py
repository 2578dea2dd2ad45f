"""Adding a task keeps the subspace's k rule (its error target) for every task; breaks are refused; quantize warns."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.errors import ErrorTargetError
from engine.io.local import load_adapter
from engine.jobs import JobRequest, run_job
from engine.subspace import SharedSubspace
from engine.subspace.rule import tolerance
from engine.types import LoRAWeights

OUT, IN, R = 24, 20, 3
MODS = ("m.layers.0.q_proj", "m.layers.0.v_proj")


def family(n: int, seed: int, k0: int = 4) -> list[LoRAWeights]:
    """Adapters whose ΔW lie in one k0-dim column and row space per module."""
    g = torch.Generator().manual_seed(seed)
    cols = {m: torch.linalg.qr(torch.randn(OUT, k0, generator=g))[0] for m in MODS}
    rows = {m: torch.linalg.qr(torch.randn(IN, k0, generator=g))[0] for m in MODS}
    cfg = {"r": R, "lora_alpha": 6.0, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny"}
    out = []
    for i in range(n):
        a = {m: torch.randn(R, k0, generator=g) @ rows[m].T for m in MODS}
        b = {m: cols[m] @ torch.randn(k0, R, generator=g) for m in MODS}
        out.append(LoRAWeights(layer_names=sorted(a), lora_a=a, lora_b=b, rank=R, metadata=dict(cfg), name=f"s{seed}_{i}"))
    return out


def true_errors(sub: SharedSubspace, originals: dict[str, LoRAWeights]) -> dict[str, dict[str, float]]:
    """Task → module → ‖ΔW − ΔŴ‖/‖ΔW‖, from the original adapters' dense ΔW and the reconstruction."""
    out: dict[str, dict[str, float]] = {}
    for tid, a in originals.items():
        rec = sub.reconstruct(tid, pad_to_vllm=False)
        out[tid] = {}
        for m in a.layer_names:
            d = a.delta_weight(m).double()
            out[tid][m] = float((d - rec.delta_weight(m).double()).norm() / d.norm())
    return out


@pytest.fixture(scope="module")
def demo_adapters(demo_dir) -> list[LoRAWeights]:
    return [load_adapter(p) for p in sorted(p for p in demo_dir.iterdir() if p.is_dir())]


def test_absorb_keeps_mean_error_target_on_demo(demo_adapters):
    ads = demo_adapters
    sub = SharedSubspace.from_adapters(ads[:-1], mean_error=0.10)
    before = sub.fidelity()
    sub.absorb(ads[-1], "newcomer")
    originals = {a.name: a for a in ads[:-1]} | {"newcomer": ads[-1]}
    true = true_errors(sub, originals)
    tol = tolerance(torch.float16)
    for m in sub.modules:  # the rule: per module, the mean over all tasks (old and new)
        assert sum(f[m] for f in true.values()) / len(true) <= 0.10 + tol
        assert sum(f[m] for f in sub.fidelity().values()) / len(sub.tasks) <= 0.10 + tol
    for tid, f in true.items():  # the reported errors of stored tasks are upper bounds of the true ones
        for m, e in f.items():
            assert e <= sub.tasks[tid].fidelity[m] + 1e-3
            if tid in before:
                assert sub.tasks[tid].fidelity[m] >= before[tid][m] - 1e-9
    assert sub.k_rule["rule"] == "mean_error" and sub.k_rule["mean_error"] == 0.10


def test_absorb_keeps_max_error_target():
    ads = family(4, seed=1) + family(1, seed=2)
    sub = SharedSubspace.from_adapters(ads[:4], max_error=0.05, dtype="float32")
    sub.absorb(ads[4], "other")
    true = true_errors(sub, {a.name: a for a in ads[:4]} | {"other": ads[4]})
    assert max(e for f in true.values() for e in f.values()) <= 0.05 + tolerance(torch.float32)
    assert max(e for f in sub.fidelity().values() for e in f.values()) <= 0.05 + tolerance(torch.float32)


def _snapshot(sub: SharedSubspace) -> tuple:
    return (sub.task_ids, json.dumps(sub.fidelity(), sort_keys=True),
            {m: {k: v.clone() for k, v in b.tensors.items()} for m, b in sub.modules.items()})


def test_absorb_that_breaks_the_target_is_refused_unless_allowed():
    # the sketch holds 4 directions and modules cannot go per-task: an unrelated task cannot fit
    ads = family(4, seed=3)
    sub = SharedSubspace.from_adapters(ads, max_error=0.01, dtype="float32", sketch_rank=4, hybrid=False)
    assert sub.compression_stats()["error"]["max"] <= 0.01
    alien = family(1, seed=4)[0]
    ids, fid, tensors = _snapshot(sub)
    with pytest.raises(ErrorTargetError, match=r"max_error 0\.01.*alien.*allow_worse") as exc:
        sub.absorb(alien, "alien")
    assert "would break" in str(exc.value)
    ids2, fid2, tensors2 = _snapshot(sub)  # nothing changed
    assert ids2 == ids and fid2 == fid
    assert all(torch.equal(tensors[m][k], tensors2[m][k]) for m in tensors for k in tensors[m])
    sub.absorb(alien, "alien", allow_worse=True)
    assert "alien" in sub.tasks and sub.tasks["alien"].max_error > 0.01


def test_project_job_refuses_a_break_and_reports_before_after(tmp_path):
    ads = family(3, seed=5)
    sub = SharedSubspace.from_adapters(ads, max_error=0.01, dtype="float32")
    path = tmp_path / "sub"
    sub.save(path)
    from engine.io.local import save_adapter

    alien = save_adapter(family(1, seed=6)[0], tmp_path / "alien")
    req = {"subspace": path, "adapter": alien, "task_id": "alien", "project": True, "output": tmp_path / "out"}
    with pytest.raises(ErrorTargetError, match="alien"):
        run_job(JobRequest("add", req))
    assert not (tmp_path / "out").exists()
    res = run_job(JobRequest("add", {**req, "allow_worse": True}))
    d = res.data
    assert d["target"]["rule"] == "max_error" and d["target"]["max_error"] == 0.01
    rows = {r["task_id"]: r for r in d["tasks"]}
    assert rows["alien"]["before"] is None and rows["alien"]["breaks_target"]
    assert rows["alien"]["after"]["max"] == pytest.approx(d["task"]["max_error"])
    for t in sub.task_ids:  # stored tasks: the same before and after (bases fixed)
        assert rows[t]["before"] == pytest.approx(rows[t]["after"]) and not rows[t]["breaks_target"]
    assert d["warnings"] and "alien" in d["warnings"][0]


def test_incremental_reports_before_after(tmp_path):
    ads = family(3, seed=7)
    SharedSubspace.from_adapters(ads, max_error=0.02, dtype="float32").save(tmp_path / "sub")
    from engine.io.local import save_adapter

    new = save_adapter(family(1, seed=8)[0], tmp_path / "new")
    res = run_job(JobRequest("add", {"subspace": tmp_path / "sub", "adapter": new, "task_id": "new", "incremental": True,
                                     "output": tmp_path / "out"}))
    d = res.data
    assert [r["task_id"] for r in d["tasks"]] == [a.name for a in ads] + ["new"]
    assert d["tasks"][-1]["after"]["max"] <= 0.02 + tolerance(torch.float32) and not d["warnings"]
    assert d["before"] == pytest.approx(d["stored_after"])


def test_in_place_add_needs_force(tmp_path):
    ads = family(3, seed=9)
    SharedSubspace.from_adapters(ads, max_error=0.02).save(tmp_path / "sub")
    from engine.errors import OutputExistsError
    from engine.io.local import save_adapter

    new = save_adapter(family(1, seed=9)[0], tmp_path / "new")
    files = {p: p.read_bytes() for p in (tmp_path / "sub").rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match="--force"):
        run_job(JobRequest("add", {"subspace": tmp_path / "sub", "adapter": new, "task_id": "n"}))
    assert {p: p.read_bytes() for p in (tmp_path / "sub").rglob("*") if p.is_file()} == files


def test_manifest_stores_the_rule_and_old_ones_get_one_inferred(tmp_path):
    ads = family(3, seed=10)
    sub = SharedSubspace.from_adapters(ads, mean_error=0.03, dtype="float32")
    sub.save(tmp_path / "sub")
    man_path = tmp_path / "sub" / "subspace.json"
    man = json.loads(man_path.read_text())
    assert man["k_rule"]["rule"] == "mean_error" and man["k_rule"]["mean_error"] == 0.03
    del man["params"], man["k_rule"]  # as an older version wrote it
    man_path.write_text(json.dumps(man))
    old = SharedSubspace.load(tmp_path / "sub")
    worst = max(e for f in old.fidelity().values() for e in f.values())
    assert old.k_rule["rule"] == "max_error" and old.k_rule["inferred"]
    assert old.k_rule["max_error"] == pytest.approx(worst, rel=1e-6)
    old.absorb(family(1, seed=10)[0], "more")  # works with the inferred rule
    assert math.isfinite(old.tasks["more"].max_error)


def test_quantize_job_warns_when_nf4_breaks_a_tight_target(tmp_path):
    ads = family(4, seed=11)
    SharedSubspace.from_adapters(ads, max_error=0.005, dtype="float32").save(tmp_path / "sub")
    res = run_job(JobRequest("quantize", {"subspace": tmp_path / "sub", "output": tmp_path / "q", "bits": 4, "method": "nf4"}))
    d = res.data
    assert d["after"]["max_error"] > 0.005 and d["target"]["max_error"] == 0.005
    assert len(d["warnings"]) == 1 and "breaks the subspace's error target (max_error 0.005)" in d["warnings"][0]
    loose = run_job(JobRequest("quantize", {"subspace": tmp_path / "sub", "output": tmp_path / "q8", "bits": 8}))
    assert loose.data["warnings"] == [] or loose.data["after"]["max_error"] > 0.005 + tolerance(torch.float32)


def test_add_names_stored_tasks_whose_bound_is_over_the_cap_within_rounding(tmp_path, demo_dir) -> None:
    """A stored task reported at 0.0501 under a 0.05 cap (inside the rounding tolerance) is named in a warning."""
    from engine.jobs import InlineRunner, JobRequest

    paths = sorted(p for p in demo_dir.iterdir() if p.is_dir())
    sub = tmp_path / "s"
    r = InlineRunner().run(JobRequest("compress", {"adapters": [str(p) for p in paths[:-1]], "output": str(sub),
                                                   "max_error": 0.0125}))
    assert r.ok, r.error
    r = InlineRunner().run(JobRequest("add", {"subspace": str(sub), "adapter": str(paths[-1]), "task_id": "new",
                                              "output": str(tmp_path / "o")}))
    assert r.ok, r.error
    over = sorted(((t["after"]["max"], t["task_id"]) for t in r.data["tasks"]
                   if t["after"]["max"] > 0.0125 and not t["breaks_target"]), reverse=True)
    named = " ".join(w for w in r.data["warnings"] if "by less than the storage rounding" in w)
    assert bool(over) == bool(named)
    if over:
        assert named.startswith(f"{len(over)} task(s)")
        assert all(t in named for _, t in over[:5])  # the worst five, by name
