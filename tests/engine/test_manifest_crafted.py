"""Crafted subspace folders: ids and file names that would become paths elsewhere, tensor files that
belong to another task or subspace, manifests of the wrong shape (issue #14, item 3)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.constants import SUBSPACE_MANIFEST_NAME
from engine.errors import SubspaceFormatError
from engine.io import load_adapter
from engine.jobs import JobRequest, run_job
from engine.subspace import SharedSubspace
from subspace_v1_writer import save_subspace as save_v1

T0 = "tasks/task_0.safetensors"


@pytest.fixture(scope="module")
def adapters(peft_family_dirs):
    return [load_adapter(p) for p in peft_family_dirs]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, adapters) -> Path:
    """Three tasks (ids task_0..task_2), joint, k=2, float32."""
    out = tmp_path_factory.mktemp("crafted") / "sub"
    SharedSubspace.from_adapters(adapters[:3], num_components=2, dtype=torch.float32, method="joint").save(out)
    return out


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "work" / "in"
    shutil.copytree(saved, dst)
    return dst


def _edit(folder: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    mp = folder / SUBSPACE_MANIFEST_NAME
    man = json.loads(mp.read_text(encoding="utf-8"))
    fn(man)
    mp.write_text(json.dumps(man), encoding="utf-8")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content (what a job may have written, anywhere)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rehash(folder: Path) -> None:
    """Refresh the manifest's checksums after a file was changed on purpose."""
    def fix(man: dict[str, Any]) -> None:
        for rel in man["files"]:
            data = (folder / rel).read_bytes()
            man["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _edit(folder, fix)


def _run(job: str, sub: Path, task_id: str, out: Path) -> Any:
    if job == "load":
        return SharedSubspace.load(sub)
    if job == "info":
        return run_job(JobRequest("info", {"path": sub}))
    if job == "quantize":
        return run_job(JobRequest("quantize", {"subspace": sub, "output": out, "bits": 8}))
    return run_job(JobRequest("export", {"subspace": sub, "task_id": task_id, "output": out}))


# -- ids and file names that become paths ------------------------------------------------


@pytest.mark.parametrize("job", ["quantize", "export", "info", "load"])
@pytest.mark.parametrize("bad", ["../../EVIL", "../../../EVIL", "../../../../EVIL", "ABSOLUTE", "a/b", "..", ""])
def test_traversal_task_id_is_refused_and_nothing_is_written(tmp_path, saved, job, bad):
    sub = _copy(saved, tmp_path)
    bad_id = str(tmp_path / "ABS_EVIL") if bad == "ABSOLUTE" else bad
    _edit(sub, lambda m: m["tasks"][0].__setitem__("id", bad_id))
    before = _tree(tmp_path)
    with pytest.raises(SubspaceFormatError) as ei:
        _run(job, sub, bad_id, tmp_path / "work" / "out")
    msg = str(ei.value)
    assert str(sub / SUBSPACE_MANIFEST_NAME) in msg and "tasks[0].id" in msg and "invalid task id" in msg
    assert _tree(tmp_path) == before  # not in the output's parent, not anywhere under tmp_path


@pytest.mark.parametrize("where", ["parent", "dotdot_inside", "absolute"])
def test_task_file_outside_the_folder_is_refused(tmp_path, saved, where):
    sub = _copy(saved, tmp_path)
    outside = tmp_path / "work" / "outside.safetensors"
    shutil.move(sub / T0, outside)
    rel = {"parent": "../outside.safetensors", "dotdot_inside": "tasks/../../outside.safetensors",
           "absolute": str(outside)}[where]

    def crafted(man: dict[str, Any]) -> None:
        man["files"][rel] = man["files"].pop(T0)
        man["tasks"][0]["file"] = rel
    _edit(sub, crafted)
    with pytest.raises(SubspaceFormatError, match=r"tasks\[0\]\.file.*tasks/<id>\.safetensors"):
        SharedSubspace.load(sub)


def test_checksum_entry_outside_the_folder_is_refused(tmp_path, saved):
    sub = _copy(saved, tmp_path)
    (tmp_path / "secret").write_text("not yours")
    _edit(sub, lambda m: m["files"].__setitem__("../../secret", {"sha256": "0" * 64, "bytes": 9}))
    with pytest.raises(SubspaceFormatError, match=r"files\['\.\./\.\./secret'\]"):
        SharedSubspace.load(sub)


def test_duplicate_task_ids_are_refused(tmp_path, saved):
    sub = _copy(saved, tmp_path)
    _edit(sub, lambda m: m["tasks"][1].__setitem__("id", "task_0"))
    with pytest.raises(SubspaceFormatError, match=r"tasks\[1\]\.id.*'task_0'.*more than once"):
        SharedSubspace.load(sub)


def test_save_refuses_a_path_outside_its_folder(tmp_path, saved):
    """The writer's own guard: a subspace object holding a bad id (built in memory) writes nothing."""
    sub = SharedSubspace.load(saved)
    sub.tasks["../../EVIL"] = sub.tasks.pop("task_0")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"'\.\./\.\./EVIL'"):
        sub.save(tmp_path / "work" / "out")
    assert _tree(tmp_path) == before


# -- tensor files that belong to another task or subspace ------------------------------------


def test_swapped_task_files_are_detected(tmp_path, saved):
    sub = _copy(saved, tmp_path)

    def swap(man: dict[str, Any]) -> None:
        a, b = man["tasks"][0], man["tasks"][1]
        a["file"], b["file"] = b["file"], a["file"]
    _edit(sub, swap)
    with pytest.raises(SubspaceFormatError) as ei:
        run_job(JobRequest("export", {"subspace": sub, "task_id": "task_0", "output": tmp_path / "exp"}))
    msg = str(ei.value)
    assert "tasks/task_1.safetensors" in msg and "'task_1'" in msg and "'task_0'" in msg
    assert not (tmp_path / "exp").exists()


def test_files_swapped_on_disk_with_their_checksums_are_detected(tmp_path, saved):
    sub = _copy(saved, tmp_path)
    a, b = sub / "tasks" / "task_1.safetensors", sub / "tasks" / "task_2.safetensors"
    tmp = a.with_suffix(".x")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    _rehash(sub)
    with pytest.raises(SubspaceFormatError, match=r"task_1\.safetensors.*'task_2'.*'task_1'"):
        SharedSubspace.load(sub)


def test_swapped_task_configs_are_detected(tmp_path, saved):
    sub = _copy(saved, tmp_path)

    def swap(man: dict[str, Any]) -> None:  # a task's config: the shared one it refers to, its name and source
        a, b = man["tasks"][0], man["tasks"][2]
        own = ("config", "name", "source")
        assert [a.get(k) for k in own] != [b.get(k) for k in own]
        for k in own:
            a[k], b[k] = b.get(k), a.get(k)
    _edit(sub, swap)
    with pytest.raises(SubspaceFormatError, match=r"task_0\.safetensors.*config"):
        SharedSubspace.load(sub)


def test_basis_of_another_subspace_is_detected(tmp_path, saved, adapters):
    other = SharedSubspace.from_adapters(adapters[3:], num_components=2, dtype=torch.float32, method="joint").save(tmp_path / "other")
    sub = _copy(saved, tmp_path)
    shutil.copy(other / "basis.safetensors", sub / "basis.safetensors")
    _rehash(sub)
    with pytest.raises(SubspaceFormatError, match=r"basis\.safetensors"):
        SharedSubspace.load(sub)


def test_basis_with_the_manifest_modules_of_another_subspace_is_detected(tmp_path, saved, adapters):
    """Basis and ``modules`` both taken from another subspace: the task files were projected onto another basis."""
    other = SharedSubspace.from_adapters(adapters[3:], num_components=2, dtype=torch.float32, method="joint").save(tmp_path / "other")
    sub = _copy(saved, tmp_path)
    shutil.copy(other / "basis.safetensors", sub / "basis.safetensors")
    modules = json.loads((other / SUBSPACE_MANIFEST_NAME).read_text())["modules"]
    _edit(sub, lambda m: m.__setitem__("modules", modules))
    _rehash(sub)
    with pytest.raises(SubspaceFormatError, match=r"task_0\.safetensors.*another basis"):
        SharedSubspace.load(sub)


def test_folders_saved_without_the_metadata_still_load(tmp_path, saved):
    """Subspaces saved before the metadata existed: no check, same tensors; a re-save adds it."""
    sub = _copy(saved, tmp_path)
    for f in [sub / "basis.safetensors", *sorted((sub / "tasks").iterdir())]:
        save_file(load_file(str(f)), str(f), metadata={"format": "pt"})
    _rehash(sub)
    back, ref = SharedSubspace.load(sub), SharedSubspace.load(saved)
    assert back.task_ids == ref.task_ids
    for t in ref.task_ids:
        for m, c in ref.tasks[t].coeffs.items():
            assert all(torch.equal(c[k], back.tasks[t].coeffs[m][k]) for k in c)
    out = back.save(tmp_path / "resaved")
    with safe_open(str(out / T0), "pt") as fh:
        assert fh.metadata()["vlora_task_id"] == "task_0"


# -- manifests of the wrong shape ---------------------------------------------------------


def _del(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.pop(key)


def _set(fn: Callable[[dict[str, Any]], Any], key: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: fn(m).__setitem__(key, value)


def _first_module(m: dict[str, Any]) -> dict[str, Any]:
    return m["modules"][sorted(m["modules"])[0]]


DEFECTS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "missing modules": (_del("modules"), r"'modules'.*missing"),
    "missing method": (_del("method"), r"'method'.*missing"),
    "missing tasks": (_del("tasks"), r"'tasks'.*missing"),
    "missing id": (lambda m: m["tasks"][1].pop("id"), r"'tasks\[1\]\.id'.*missing"),
    "missing file": (lambda m: m["tasks"][0].pop("file"), r"'tasks\[0\]\.file'.*missing"),
    "tasks not a list": (_set(lambda m: m, "tasks", "task_0"), r"'tasks'.*must be a list.*str"),
    "task not a dict": (lambda m: m["tasks"].__setitem__(0, "task_0"), r"'tasks\[0\]'.*must be an object.*str"),
    "modules not a dict": (_set(lambda m: m, "modules", []), r"'modules'.*must be an object.*list"),
    "module not a dict": (lambda m: m["modules"].__setitem__(sorted(m["modules"])[0], 3), r"'modules\[.*\]'.*must be an object"),
    "unknown kind": (_set(_first_module, "kind", "svd"), r"'modules\[.*\]\.kind'.*'joint', 'pca' or 'separate'"),
    "shape not two ints": (_set(_first_module, "shape", "12x10"), r"'modules\[.*\]\.shape'.*two integers"),
    "rank a string": (_set(_first_module, "rank", "4"), r"'modules\[.*\]\.rank'.*integer"),
    "explained not numbers": (_set(_first_module, "explained", ["a"]), r"'modules\[.*\]\.explained'.*numbers"),
    "files not a dict": (_set(lambda m: m, "files", []), r"'files'.*must be an object"),
    "bytes a string": (lambda m: m["files"][T0].__setitem__("bytes", "12"), r"'files\['tasks/task_0.safetensors'\]\.bytes'.*integer"),
    "format_version a string": (_set(lambda m: m, "format_version", "1"), r"'format_version'.*integer"),
    "dtype a number": (_set(lambda m: m, "dtype", 16), r"'dtype'"),
    "dtype unknown": (_set(lambda m: m, "dtype", "int3"), r"'dtype'.*'int3'"),
    "method not a string": (_set(lambda m: m, "method", ["joint"]), r"'method'.*string"),
    "params not a dict": (_set(lambda m: m, "params", "k=2"), r"'params'.*must be an object"),
    "basis specs not a list": (_set(_first_module, "tensors", "U"), r"'modules\[.*\]\.tensors'.*list of tensor specs"),
    "basis spec not a spec": (lambda m: _first_module(m)["tensors"].__setitem__(0, "U=3:int7"),
                              r"'modules\[.*\]\.tensors\[0\]'.*must be a tensor spec.*'U=3:int7'"),
    "task specs missing": (lambda m: m["tasks"][0].pop("tensors"), r"'tasks\[0\]\.tensors'.*missing"),
    "task specs one short": (lambda m: m["tasks"][0]["tensors"].pop(), r"'tasks\[0\]\.tensors'.*one per module"),
    "config not an index": (_set(lambda m: m["tasks"][0], "config", ["r", 4]), r"'tasks\[0\]\.config'.*index of one of"),
    "config index out of range": (_set(lambda m: m["tasks"][0], "config", 7), r"'tasks\[0\]\.config'.*index of one of"),
    "configs not a list": (_set(lambda m: m, "configs", {}), r"'configs'.*must be a list"),
    "config not a dict": (lambda m: m["configs"].__setitem__(0, ["r", 4]), r"'configs\[0\]'.*must be an object"),
    "config rank a string": (lambda m: m["configs"][0].__setitem__("rank", "four"), r"'configs\[0\]\.rank'.*integer"),
    "source a number": (_set(lambda m: m["tasks"][0], "source", 3), r"'tasks\[0\]\.source'.*string or null"),
    "fidelity not a list": (_set(lambda m: m["tasks"][0], "fidelity", "low"), r"'tasks\[0\]\.fidelity'.*must be an object or a list"),
    "fidelity one short": (lambda m: m["tasks"][0]["fidelity"].pop(), r"'tasks\[0\]\.fidelity'.*one per module"),
    "fidelity a string value": (lambda m: m["tasks"][0]["fidelity"].__setitem__(0, "low"), r"'tasks\[0\]\.fidelity\[0\]'.*number"),
    "ranks a float": (lambda m: m["tasks"][0]["ranks"].__setitem__(1, 2.5), r"'tasks\[0\]\.ranks\[1\]'.*integer"),
    "error_is_bound a string": (_set(lambda m: m["tasks"][0], "error_is_bound", "no"), r"'tasks\[0\]\.error_is_bound'.*true or false"),
    "original_bytes negative": (_set(lambda m: m["tasks"][0], "original_bytes", -1), r"'tasks\[0\]\.original_bytes'.*integer"),
    "id a number": (_set(lambda m: m["tasks"][0], "id", 7), r"'tasks\[0\]\.id'.*string"),
}


#: The same defects in a folder of format version 1 (a config per task, the ``quantized`` map, objects per module).
DEFECTS_V1: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    **{k: v for k, v in DEFECTS.items() if not k.startswith(("basis spec", "task spec", "config", "source", "fidelity", "ranks"))},
    "quantized not a dict": (_set(lambda m: m, "quantized", []), r"'quantized'.*must be an object"),
    "quant info not a dict": (lambda m: m["quantized"].__setitem__("basis.safetensors", {"x::U": 4}),
                              r"'quantized\['basis.safetensors'\]\['x::U'\]'.*must be an object"),
    "config not a dict": (_set(lambda m: m["tasks"][0], "config", ["r", 4]), r"'tasks\[0\]\.config'.*must be an object"),
    "config rank a string": (lambda m: m["tasks"][0]["config"].__setitem__("rank", "four"), r"'tasks\[0\]\.config\.rank'.*integer"),
    "fidelity not a dict": (_set(lambda m: m["tasks"][0], "fidelity", [0.1]), r"'tasks\[0\]\.fidelity'.*must be an object"),
    "fidelity a string value": (lambda m: m["tasks"][0]["fidelity"].__setitem__("x", "low"), r"'tasks\[0\]\.fidelity\['x'\]'.*number"),
    "ranks a float": (lambda m: m["tasks"][0]["ranks"].__setitem__("x", 2.5), r"'tasks\[0\]\.ranks\['x'\]'.*integer"),
}


@pytest.fixture(scope="module")
def saved_v1(tmp_path_factory, adapters) -> Path:
    """``saved`` as format version 1 wrote it."""
    out = tmp_path_factory.mktemp("crafted_v1") / "sub"
    save_v1(SharedSubspace.from_adapters(adapters[:3], num_components=2, dtype=torch.float32, method="joint"), out)
    return out


@pytest.mark.parametrize("defect", sorted(DEFECTS_V1))
def test_structural_defect_of_format_1_is_named(tmp_path, saved_v1, defect):
    sub = _copy(saved_v1, tmp_path)
    fn, pattern = DEFECTS_V1[defect]
    _edit(sub, fn)
    with pytest.raises(SubspaceFormatError, match=pattern) as ei:
        SharedSubspace.load(sub)
    assert str(ei.value).startswith(f"{sub / SUBSPACE_MANIFEST_NAME}: ") and "\n" not in str(ei.value)


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_structural_defect_is_named(tmp_path, saved, defect):
    sub = _copy(saved, tmp_path)
    fn, pattern = DEFECTS[defect]
    _edit(sub, fn)
    with pytest.raises(SubspaceFormatError, match=pattern) as ei:
        SharedSubspace.load(sub)
    assert str(ei.value).startswith(f"{sub / SUBSPACE_MANIFEST_NAME}: ") and "\n" not in str(ei.value)


def test_all_structural_defects_are_collected(tmp_path, saved):
    sub = _copy(saved, tmp_path)
    _edit(sub, lambda m: (m.pop("modules"), m["tasks"][1].pop("id"), m["tasks"][2].__setitem__("ranks", 3)))
    with pytest.raises(SubspaceFormatError) as ei:
        SharedSubspace.load(sub)
    msg = str(ei.value)
    assert "'modules'" in msg and "'tasks[1].id'" in msg and "'tasks[2].ranks'" in msg


# -- the seed vlora layout ----------------------------------------------------------------


def _write_seed(tmp_path: Path, adapters, ids: list[str], names: dict[str, str]) -> Path:
    """A seed ``vlora`` folder (subspace_meta.json, subspace.safetensors, task_<name>.safetensors) of a pca build."""
    sub = SharedSubspace.from_adapters(adapters[:len(ids)], num_components=2, method="pca", dtype=torch.float32)
    folder = tmp_path / "seed"
    folder.mkdir()
    src = {"comp_a": "components_a", "comp_b": "components_b", "mean_a": "mean_a", "mean_b": "mean_b",
           "sv_a": "sv_a", "sv_b": "sv_b"}
    save_file({f"{m}.{src[k]}": t.contiguous() for m, b in sub.modules.items() for k, t in b.tensors.items()},
              str(folder / "subspace.safetensors"))
    for tid, proj in zip(ids, sub.tasks.values()):
        save_file({f"{m}.loadings_{x}": c[f"l{x}"].contiguous() for m, c in proj.coeffs.items() for x in "ab"},
                  str(folder / f"task_{names.get(tid, tid)}.safetensors"))
    a0 = adapters[0]
    meta = {"layer_names": sub.layer_names, "rank": a0.rank, "num_components": 2, "task_ids": ids,
            "task_filenames": names,
            "shapes_a": {m: list(a0.lora_a[m].shape) for m in sub.layer_names},
            "shapes_b": {m: list(a0.lora_b[m].shape) for m in sub.layer_names}}
    (folder / "subspace_meta.json").write_text(json.dumps(meta))
    return folder


def test_seed_folder_with_plain_ids_loads(tmp_path, adapters):
    seed = _write_seed(tmp_path, adapters, ["alpha", "beta", "gamma"], {})
    assert SharedSubspace.load(seed).task_ids == ["alpha", "beta", "gamma"]


def test_seed_task_id_that_becomes_a_path_is_refused(tmp_path, adapters):
    seed = _write_seed(tmp_path, adapters, ["alpha", "../../EVIL", "gamma"], {"../../EVIL": "beta"})
    before = _tree(tmp_path)
    with pytest.raises(SubspaceFormatError, match=r"subspace_meta\.json.*task_ids.*invalid task id '\.\./\.\./EVIL'"):
        run_job(JobRequest("quantize", {"subspace": seed, "output": tmp_path / "out" / "q", "bits": 8}))
    assert _tree(tmp_path) == before


def test_seed_task_file_name_outside_the_folder_is_refused(tmp_path, adapters):
    seed = _write_seed(tmp_path, adapters, ["alpha", "beta", "gamma"], {})
    (seed / "task_x").mkdir()  # task_x/../../outside.safetensors is the folder's sibling
    shutil.move(seed / "task_beta.safetensors", tmp_path / "outside.safetensors")
    meta = json.loads((seed / "subspace_meta.json").read_text())
    meta["task_filenames"] = {"beta": "x/../../outside"}
    (seed / "subspace_meta.json").write_text(json.dumps(meta))
    with pytest.raises(SubspaceFormatError, match=r"subspace_meta\.json.*task_filenames.*'x/\.\./\.\./outside'"):
        SharedSubspace.load(seed)


@pytest.mark.parametrize("method", ["joint", "share", "pca", "svd"])
def test_every_method_round_trips_with_its_metadata(tmp_path, adapters, method):
    sub = SharedSubspace.from_adapters(adapters[:3], num_components=2, method=method, dtype=torch.float32)
    back = SharedSubspace.load(sub.save(tmp_path / "s"))
    assert back.task_ids == sub.task_ids and {m: b.kind for m, b in back.modules.items()} == {m: b.kind for m, b in sub.modules.items()}
    with safe_open(str(tmp_path / "s" / "tasks" / f"{sub.task_ids[1]}.safetensors"), "pt") as fh:
        assert fh.metadata()["vlora_task_id"] == sub.task_ids[1]
