"""Analysis through small products, checked against dense ΔW on small shapes."""

from __future__ import annotations

import json
import threading

import pytest
import torch

# the rich results under engine's own names (the seed-named functions: test_seed_parity.py)
from engine.analysis import (
    coverage_report,
    diff_report,
    explained_variance,
    find_clusters,
    outlier_report,
    similarity_report,
)
from engine.errors import IncompatibleAdaptersError, JobCancelled
from engine.io import load_adapter
from engine.types import LoRAWeights

MODS = ("m.0.q", "m.0.v", "m.1.q")


def _adapter(seed: int, *, r: int = 3, out: int = 12, inn: int = 10, alpha: float = 6.0, rslora: bool = False,
             modules: tuple[str, ...] = MODS, name: str | None = None) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    return LoRAWeights(
        layer_names=list(modules),
        lora_a={m: torch.randn(r, inn, generator=g) for m in modules},
        lora_b={m: torch.randn(out, r, generator=g) for m in modules},
        rank=r, lora_alpha=alpha, use_rslora=rslora, name=name or f"s{seed}",
    )


def _family(center: int, members: int, noise: float, start: int) -> list[LoRAWeights]:
    base = _adapter(center)
    out = []
    for i in range(members):
        n = _adapter(start + i)
        out.append(LoRAWeights(
            layer_names=list(MODS),
            lora_a={m: base.lora_a[m] + noise * n.lora_a[m] for m in MODS},
            lora_b={m: base.lora_b[m] + noise * n.lora_b[m] for m in MODS},
            rank=3, lora_alpha=6.0, name=f"f{center}_{i}",
        ))
    return out


def _dense_flat(a: LoRAWeights, modules=MODS) -> torch.Tensor:
    return torch.cat([a.delta_weight(m).double().flatten() for m in modules])


def _dense_cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


@pytest.fixture()
def mixed() -> list[LoRAWeights]:
    return [_adapter(0, r=3), _adapter(1, r=2, alpha=4.0), _adapter(2, r=5, rslora=True), _adapter(3, r=1)]


# -- similarity ---------------------------------------------------------------------


def test_similarity_equals_dense_cosine(mixed):
    res = similarity_report(mixed)
    flats = [_dense_flat(a) for a in mixed]
    for i in range(len(mixed)):
        assert res.norms[i] == pytest.approx(float(flats[i].norm()), rel=1e-5)
        for j in range(len(mixed)):
            assert float(res.matrix[i, j]) == pytest.approx(_dense_cos(flats[i], flats[j]), abs=1e-5)
            for m in MODS:
                want = _dense_cos(mixed[i].delta_weight(m).double().flatten(), mixed[j].delta_weight(m).double().flatten())
                assert float(res.per_module[m][i, j]) == pytest.approx(want, abs=1e-5)


def test_similarity_on_peft_written_adapters(peft_family_dirs, peft_variant_dirs):
    adapters = [load_adapter(d) for d in peft_family_dirs[:3]] + [load_adapter(peft_variant_dirs["patterns"])]
    mods = tuple(adapters[0].layer_names)
    res = similarity_report(adapters)
    flats = [_dense_flat(a, mods) for a in adapters]
    want = torch.tensor([[_dense_cos(x, y) for y in flats] for x in flats], dtype=torch.float64)
    assert torch.allclose(res.matrix, want, atol=1e-5)


def test_similarity_is_invariant_to_rotation_and_scale_of_factors(mixed):
    before = similarity_report(mixed).matrix
    g = torch.Generator().manual_seed(9)
    rotated = []
    for a in mixed:
        r = a.rank
        q = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q.float()
        c = 3.7
        rotated.append(LoRAWeights(
            layer_names=list(a.layer_names),
            lora_a={m: q.T @ a.lora_a[m] / c for m in a.layer_names},
            lora_b={m: a.lora_b[m] @ q * c for m in a.layer_names},
            rank=r, lora_alpha=a.lora_alpha, use_rslora=a.use_rslora, name=a.name,
        ))
    after = similarity_report(rotated).matrix
    assert torch.allclose(before, after, atol=1e-5)
    # a negated copy is perfectly anti-similar
    neg = LoRAWeights(layer_names=list(MODS), lora_a=dict(mixed[0].lora_a),
                      lora_b={m: -t for m, t in mixed[0].lora_b.items()}, rank=3, lora_alpha=6.0)
    assert float(similarity_report([mixed[0], neg]).matrix[0, 1]) == pytest.approx(-1.0, abs=1e-6)


def test_zero_update_has_zero_similarity(mixed):
    zero = LoRAWeights(layer_names=list(MODS), lora_a=dict(mixed[0].lora_a),
                       lora_b={m: torch.zeros_like(t) for m, t in mixed[0].lora_b.items()}, rank=3, lora_alpha=6.0)
    res = similarity_report([mixed[0], zero])
    assert res.matrix.tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_huge_shapes_never_form_dense_updates():
    # 200k × 150k updates would need 120 GB each if formed densely
    mods = ("big",)
    ads = [_adapter(i, r=2, out=200_000, inn=150_000, modules=mods) for i in range(3)]
    sim = similarity_report(ads)
    assert sim.matrix.shape == (3, 3)
    d = diff_report(ads[0], ads[1])
    assert d.overall.relative_difference > 0
    u = torch.linalg.qr(ads[0].lora_b["big"].double()).Q
    assert coverage_report({"big": (u, None)}, ads[0]).overall == pytest.approx(1.0, abs=1e-6)
    ev = explained_variance(ads)
    assert ev.ratio("big", 6) == pytest.approx(1.0, abs=1e-6)


def test_incompatible_adapters_raise(mixed):
    with pytest.raises(IncompatibleAdaptersError):
        similarity_report([mixed[0], _adapter(5, inn=11)])
    with pytest.raises(IncompatibleAdaptersError):
        similarity_report([mixed[0], _adapter(5, modules=("m.0.q",))])
    with pytest.raises(ValueError):
        similarity_report([])


# -- clusters and outliers ------------------------------------------------------------


def test_find_clusters_recovers_families():
    fams = _family(100, 3, 0.3, 200) + _family(101, 4, 0.3, 300) + _family(102, 2, 0.3, 400)
    sim = similarity_report(fams)
    clusters = find_clusters(sim, 0.6)
    assert clusters.clusters == [[3, 4, 5, 6], [0, 1, 2], [7, 8]]
    assert clusters.labels() == [1, 1, 1, 0, 0, 0, 0, 2, 2]
    d = clusters.to_dict()
    assert d["clusters"][1]["names"] == ["f100_0", "f100_1", "f100_2"]
    json.dumps(d, allow_nan=False)
    # everything together at a threshold below every similarity, everything apart above them
    assert len(find_clusters(sim, -1.0)) == 1
    assert len(find_clusters(sim, 1.01)) == len(fams)


def test_average_linkage_does_not_chain_single_does():
    # 0~1 and 1~2 are similar, 0 and 2 are not
    sim = [[1.0, 0.8, 0.0], [0.8, 1.0, 0.8], [0.0, 0.8, 1.0]]
    assert find_clusters(sim, 0.5, linkage="single").clusters == [[0, 1, 2]]
    assert find_clusters(sim, 0.5, linkage="average").clusters == [[0, 1], [2]]
    with pytest.raises(ValueError, match="linkage"):
        find_clusters(sim, 0.5, linkage="ward")
    with pytest.raises(ValueError, match="square"):
        find_clusters([[1.0, 0.5]], 0.5)


def test_outlier_report():
    fams = _family(100, 3, 0.3, 200) + [_adapter(999, name="odd")]
    res = outlier_report(fams, 0.3)
    assert res.outliers == [3] and res.names[3] == "odd"
    assert res.max_similarity[3] < 0.3 < min(res.max_similarity[:3])
    json.dumps(res.to_dict(), allow_nan=False)
    # a negated copy is not an outlier: |cos| = 1
    sim = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.05], [0.0, 0.05, 1.0]])
    assert outlier_report(sim, 0.1).outliers == [2]
    assert outlier_report(torch.ones(1, 1), 0.5).outliers == []


# -- diff -------------------------------------------------------------------------------


def test_adapter_diff_matches_dense(mixed):
    a, b = mixed[0], mixed[2]
    res = diff_report(a, b)
    for d in res.modules:
        wa, wb = a.delta_weight(d.module).double(), b.delta_weight(d.module).double()
        assert d.norm_a == pytest.approx(float(wa.norm()), rel=1e-6)
        assert d.norm_b == pytest.approx(float(wb.norm()), rel=1e-6)
        assert d.cosine == pytest.approx(_dense_cos(wa.flatten(), wb.flatten()), abs=1e-6)
        assert d.relative_difference == pytest.approx(float((wa - wb).norm() / wa.norm()), rel=1e-6)
        assert (d.rank_a, d.rank_b) == (3, 5)
    fa, fb = _dense_flat(a), _dense_flat(b)
    assert res.overall.relative_difference == pytest.approx(float((fa - fb).norm() / fa.norm()), rel=1e-6)
    same = diff_report(a, a)
    assert same.overall.relative_difference == pytest.approx(0.0, abs=1e-6) and same.overall.cosine == pytest.approx(1.0)
    json.dumps(res.to_dict(), allow_nan=False)


def test_adapter_diff_lists_unshared_modules_and_rejects_shape_mismatch(mixed):
    other = _adapter(7, modules=("m.0.q", "m.2.o"))
    res = diff_report(mixed[0], other)
    assert [d.module for d in res.modules] == ["m.0.q"]
    assert res.only_in_a == ["m.0.v", "m.1.q"] and res.only_in_b == ["m.2.o"]
    with pytest.raises(IncompatibleAdaptersError, match="m.0.q"):
        diff_report(mixed[0], _adapter(8, out=13))
    zero = LoRAWeights(layer_names=list(MODS), lora_a=dict(mixed[0].lora_a),
                       lora_b={m: torch.zeros_like(t) for m, t in mixed[0].lora_b.items()}, rank=3, lora_alpha=6.0)
    d = diff_report(zero, mixed[0]).to_dict()
    assert d["overall"]["relative_difference"] is None  # inf is not JSON
    json.dumps(d, allow_nan=False)


# -- coverage ---------------------------------------------------------------------------


def _dense_coverage(a: LoRAWeights, m: str, u, v) -> float:
    w = a.delta_weight(m).double()
    p = w
    if u is not None:
        qu = torch.linalg.qr(u.double()).Q
        p = qu.T @ p
    if v is not None:
        qv = torch.linalg.qr(v.double()).Q
        p = p @ qv
    return float(p.norm() ** 2 / w.norm() ** 2)


def test_subspace_coverage_matches_dense_for_each_basis_kind(mixed):
    a = mixed[2]
    g = torch.Generator().manual_seed(4)
    u = torch.randn(12, 4, generator=g)
    v = torch.randn(10, 5, generator=g)
    bases = {"m.0.q": (u, v), "m.0.v": (u, None), "m.1.q": (None, v)}
    res = coverage_report(bases, a)
    for m, (bu, bv) in bases.items():
        assert res.modules[m] == pytest.approx(_dense_coverage(a, m, bu, bv), abs=1e-6)
    energy = {m: float(a.delta_weight(m).double().norm() ** 2) for m in MODS}
    overall = sum(res.modules[m] * energy[m] for m in MODS) / sum(energy.values())
    assert res.overall == pytest.approx(overall, rel=1e-6)
    json.dumps(res.to_dict(), allow_nan=False)


def test_subspace_coverage_extremes_and_protocols(mixed):
    a = mixed[0]
    own_u = {m: a.lora_b[m] for m in MODS}
    own_v = {m: a.lora_a[m] for m in MODS}  # components_a rows: k×in

    class VloraStyle:
        components_b = own_u
        components_a = own_v

    class Basis:  # the shared subspace's joint basis record
        def __init__(self, u, v):
            self.kind = "joint"
            self.tensors = {"U": u, "V": v}

    class WithBases:
        bases = {m: Basis(own_u[m], own_v[m].T) for m in MODS}

    for sub in (VloraStyle(), WithBases()):
        assert coverage_report(sub, a).overall == pytest.approx(1.0, abs=1e-6)
    # the orthogonal complement of the column space captures nothing
    comp = {}
    for m in MODS:
        q = torch.linalg.qr(a.lora_b[m].double(), mode="complete").Q
        comp[m] = (q[:, 3:], None)
    assert coverage_report(comp, a).overall == pytest.approx(0.0, abs=1e-6)
    partial = coverage_report({"m.0.q": comp["m.0.q"]}, a)
    assert partial.missing == ["m.0.v", "m.1.q"]
    with pytest.raises(IncompatibleAdaptersError, match="column"):
        coverage_report({"m.0.q": (torch.randn(11, 2), None)}, a)
    with pytest.raises(ValueError, match="no column/row bases"):
        coverage_report({"other": (torch.randn(12, 2), None)}, a)
    with pytest.raises(ValueError, match="offers no"):
        coverage_report(object(), a)


# -- explained variance ----------------------------------------------------------------------


def test_explained_variance_matches_dense_svd(mixed):
    ev = explained_variance(mixed, ks=[1, 3, 50])
    row = explained_variance(mixed, side="row")
    for m in MODS:
        stacked_cols = torch.cat([a.delta_weight(m).double() for a in mixed], dim=1)
        s = torch.linalg.svdvals(stacked_cols) ** 2
        want = (s.cumsum(0) / s.sum()).tolist()
        assert ev.cumulative(m) == pytest.approx(want[: len(ev.cumulative(m))], abs=1e-5)
        assert ev.ratio(m, 50) == pytest.approx(1.0)
        stacked_rows = torch.cat([a.delta_weight(m).double() for a in mixed], dim=0)
        s = torch.linalg.svdvals(stacked_rows) ** 2
        assert row.cumulative(m) == pytest.approx((s.cumsum(0) / s.sum()).tolist()[: len(row.cumulative(m))], abs=1e-5)
    d = ev.to_dict()
    assert set(d["mean"]) == {"1", "3", "50"} and d["modules"]["m.0.q"]["k90"] >= 1
    json.dumps(d, allow_nan=False)
    with pytest.raises(ValueError, match="side"):
        explained_variance(mixed, side="both")


def test_explained_variance_sees_peft_families(peft_family_dirs):
    # each family's factors come from a rank-6 basis (r=4 + 2) plus 1% noise
    fam = [load_adapter(d) for d in peft_family_dirs[:3]]
    both = fam + [load_adapter(d) for d in peft_family_dirs[3:]]
    one = explained_variance(fam, ks=[6])
    two = explained_variance(both, ks=[6, 12])
    for m in fam[0].layer_names:
        assert one.ratio(m, 6) > 0.99
        assert two.ratio(m, 6) < 0.95 and two.ratio(m, 12) > 0.99


# -- progress and cancel ----------------------------------------------------------------------


def test_progress_and_cancel(mixed):
    seen = []
    similarity_report(mixed, progress=seen.append)
    assert [p.step for p in seen] == [0, 1, 2, 3]
    ev = threading.Event()
    ev.set()
    for call in (
        lambda: similarity_report(mixed, cancel=ev),
        lambda: diff_report(mixed[0], mixed[1], cancel=ev),
        lambda: explained_variance(mixed, cancel=ev),
        lambda: coverage_report({"m.0.q": (torch.randn(12, 2), None)}, mixed[0], cancel=ev),
    ):
        with pytest.raises(JobCancelled):
            call()


def test_similarity_to_dict_is_json(mixed):
    d = similarity_report(mixed).to_dict()
    text = json.dumps(d, allow_nan=False)
    assert set(json.loads(text)) == {"names", "matrix", "norms", "modules"}
    assert len(d["modules"]["m.0.q"]["matrix"]) == 4
    assert "modules" not in similarity_report(mixed).to_dict(modules=False)


def test_coverage_of_a_real_shared_subspace(peft_family_dirs):
    """Against engine.subspace: with orthonormal U, V, coverage = 1 − (relative reconstruction error)²."""
    from engine.subspace import SharedSubspace

    family = [load_adapter(d) for d in peft_family_dirs[:3]]
    stranger = load_adapter(peft_family_dirs[3])
    sub = SharedSubspace.from_adapters(family, num_components=4, method="joint", hybrid=False)
    for a, tid in zip(family, sub.task_ids):
        cov = coverage_report(sub, a)
        fidelity = sub.tasks[tid].fidelity
        for m, c in cov.modules.items():
            assert c == pytest.approx(1.0 - fidelity[m] ** 2, abs=1e-3)
        assert cov.overall > 0.7 and not cov.missing
    assert coverage_report(sub, stranger).overall < 0.05
