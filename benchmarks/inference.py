#!/usr/bin/env python
"""Serving many tasks: ``VLoRAModel`` vs PEFT on one Llama-shaped model (one process).

A script, not a test. It builds a Llama-shaped model from a config (random weights, no
download), writes T q/v LoRA adapters (r16) with PEFT's own ``save_pretrained`` (built
around a common column and row space plus noise, so that a shared basis exists, as for
adapters trained from one init on related tasks), and times one forward of a batch:

* base model alone;
* PEFT, one adapter active (``set_adapter``), and a mixed batch (``adapter_names=`` per row);
* ours, one task (``set_task``) and a mixed batch (``task_ids=`` per row), for a shared
  subspace (every module in the shared basis) and a hybrid one (q_proj shared, v_proj
  stored per task);
* ``set_task`` vs PEFT's ``set_adapter`` latency when switching between two loaded tasks;
* memory per added task: PEFT's LoRA tensors in the model vs our cached per-task factors
  (in memory, compute dtype) and stored coefficients (on disk, fp16).

Results are checked in the same run: ours vs PEFT loading the reconstructed adapter (must
agree to fp32 rounding), and the update vs PEFT with the original adapter (the compression
error, relative to the adapter's effect on the logits).

Usage:
    python benchmarks/inference.py                       # CPU: hidden 1024, 4 layers, batch 8×256, T=8,64
    python benchmarks/inference.py --tasks 8 --seq 64    # quicker
    python benchmarks/inference.py --gpu                 # CUDA bf16: hidden 4096, 8 layers
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def build_base(hidden: int, layers: int, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
                      vocab_size=4096, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def write_adapters(base: Any, root: Path, n: int, rank: int, noise: float) -> list[Path]:
    """T adapters written by PEFT: A = G·Vcᵀ + noise, B = Uc·H + noise with per-module shared Uc, Vc (2r wide)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base).float().cpu(),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                      lora_dropout=0.0, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    layers = [(name, mod) for name, mod in model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A]
    common = {}
    for name, mod in layers:
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        common[name] = (torch.linalg.qr(torch.randn(a.shape[1], 2 * rank, generator=g))[0],
                        torch.linalg.qr(torch.randn(b.shape[0], 2 * rank, generator=g))[0])
    out = []
    with torch.no_grad():
        for t in range(n):
            for name, mod in layers:
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                vc, uc = common[name]
                a.copy_(torch.randn(rank, 2 * rank, generator=g) @ vc.T + noise * torch.randn(a.shape, generator=g))
                b.copy_(uc @ torch.randn(2 * rank, rank, generator=g) * 0.05
                        + 0.05 * noise * torch.randn(b.shape, generator=g))
            model.save_pretrained(str(root / f"t{t}"))
            out.append(root / f"t{t}")
    return out


def hybrid_of(shared: Any, alone: Any, per_task: str) -> Any:
    """``shared`` with the modules whose name ends with ``per_task`` taken from ``alone`` (stored per task)."""
    sub = shared.copy()
    for m in sub.modules:
        if m.endswith(per_task):
            sub.modules[m] = alone.modules[m]
            for t in sub.tasks:
                sub.tasks[t].coeffs[m] = alone.tasks[t].coeffs[m]
    return sub


def interleaved(fns: dict[str, Any], rounds: int, sync: Any) -> dict[str, list[float]]:
    """Seconds of each ``fns[name]()`` over ``rounds`` rounds, every function once per round, in turn.

    On a shared machine the load drifts over minutes; timing the configurations in turn, round
    after round, lets each round's base-model time be subtracted from the others of the same round
    (paired differences), so the drift cancels out of the overheads.
    """
    for fn in fns.values():  # warm-up
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def overhead(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``name``'s time minus ``base``'s in the same round."""
    return statistics.median(a - b for a, b in zip(times[name], times[base]))


def switch_latency(switch: Any, a: str, b: str, n: int) -> float:
    """Median seconds of one switch between two loaded tasks."""
    switch(a)
    switch(b)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        switch(a if i % 2 == 0 else b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lora_bytes(adapter_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())


def stored_task_bytes(sub: Any, task: str) -> int:
    """Bytes of one task's coefficients as the subspace stores them (its storage dtype)."""
    el = torch.empty(0, dtype=sub.dtype).element_size()
    return sum(t.numel() * el for c in sub.tasks[task].coeffs.values() for t in c.values())


def run(args: argparse.Namespace, n_tasks: int, base: Any, work: Path, rows: list[list[str]]) -> None:
    from peft import PeftModel

    from engine import SharedSubspace, VLoRAModel, load_adapter, save_adapter

    dev, dt = args.device, args.dtype
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    root = work / f"T{n_tasks}"
    root.mkdir()
    t0 = time.perf_counter()
    dirs = write_adapters(base, root, n_tasks, args.rank, args.noise)
    adapters = [load_adapter(d) for d in dirs]
    ids = [f"t{i}" for i in range(n_tasks)]
    shared = SharedSubspace.from_adapters(adapters, ids, max_error=args.max_error, hybrid=False)
    alone = SharedSubspace.from_adapters(adapters, ids, method="svd", max_error=args.max_error)
    hybrid = hybrid_of(shared, alone, "v_proj")
    subs = {"shared": shared, "hybrid": hybrid}
    print(f"T={n_tasks}: adapters and subspaces built in {time.perf_counter() - t0:.1f} s; shared k per module: "
          f"{sorted(set(shared.k_per_module.values()))}, max ΔW error {shared.compression_stats()['error']['max']:.3f}",
          file=sys.stderr)

    batch = [ids[i % n_tasks] for i in range(args.batch)]
    x = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(2)).to(dev)
    xs = x[:, : min(args.seq, 32)]  # correctness checks on a short prefix

    # PEFT: every original adapter, plus the reconstructed ones of the batch's tasks (for the exact check)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="t0").eval()
    for t, d in zip(ids[1:], dirs[1:]):
        peft.load_adapter(str(d), adapter_name=t)
    for name, sub in subs.items():
        for t in dict.fromkeys(batch):
            rd = root / f"rec-{name}-{t}"
            save_adapter(sub.reconstruct(t), rd)
            peft.load_adapter(str(rd), adapter_name=f"{name}-{t}")
    peft.to(device=dev, dtype=dt)
    ours = {name: VLoRAModel(copy.deepcopy(base), sub).preload() for name, sub in subs.items()}

    def logits(model: Any, inp: Any, **kw: Any) -> Any:
        with torch.no_grad():
            return model(input_ids=inp, **kw).logits.float()

    # checks: ours == PEFT with the reconstructed adapter; vs the original adapter: the compression error
    with torch.no_grad():
        with peft.disable_adapter():
            lb = logits(peft, xs)
        lo = logits(peft, xs, adapter_names=batch)
        checks = []
        for name, m in ours.items():
            mixed = logits(m, xs, task_ids=batch)
            rec = logits(peft, xs, adapter_names=[f"{name}-{t}" for t in batch])
            m.set_task(batch[0])
            one = logits(m, xs[:1])
            peft.set_adapter(f"{name}-{batch[0]}")
            ref_one = logits(peft, xs[:1])
            scale = float(rec.abs().max())
            exact = max(float((mixed - rec).abs().max()), float((one - ref_one).abs().max())) / scale
            vs_orig = float((mixed - lo).norm() / (lo - lb).norm())
            checks.append((name, exact, vs_orig))
            tol = 1e-4 if dt == torch.float32 else 3e-2
            if exact > tol:
                raise SystemExit(f"CHECK FAILED: {name}: ours vs PEFT (reconstructed) max rel diff {exact:.2e} > {tol}")
    for name, exact, vs_orig in checks:
        print(f"T={n_tasks} check {name}: ours vs PEFT(reconstructed) max|Δ|/max|logit| = {exact:.1e}; "
              f"vs PEFT(original) ‖Δ‖/‖effect‖ = {vs_orig:.3f}", file=sys.stderr)

    def fwd(model: Any, inp: Any, **kw: Any) -> Any:
        def f() -> None:
            with torch.no_grad():
                model(input_ids=inp, **kw)
        return f

    class Active:
        """A forward with one task set first (``set_task``/``set_adapter`` cost microseconds, not timed apart)."""

        def __init__(self, set_one: Any, task: str, model: Any) -> None:
            self.set_one, self.task, self.model = set_one, task, model

        def __call__(self) -> None:
            self.set_one(self.task)
            with torch.no_grad():
                self.model(input_ids=x)

    def peft_one(t: str) -> None:
        peft.set_adapter(t)

    # the mixed batch of the table: one row per task of `batch` (at most batch-size distinct tasks);
    # and a wide one: one row for each of the T tasks (T rows × seq·batch/T tokens, same tokens).
    wide_rows = n_tasks
    wide_seq = max(8, args.batch * args.seq // wide_rows)
    xw = torch.randint(0, 4096, (wide_rows, wide_seq), generator=torch.Generator().manual_seed(3)).to(dev)
    wide = ids[:wide_rows]
    fns: dict[str, Any] = {"base": fwd(base, x), "peft one": Active(peft_one, "t0", peft),
                           "peft mixed": fwd(peft, x, adapter_names=batch)}
    for name, m in ours.items():
        fns[f"{name} one"] = Active(m.set_task, "t0", m)
        fns[f"{name} mixed"] = fwd(m, x, task_ids=batch)
    if wide_rows != args.batch:
        fns["base wide"] = fwd(base, xw)
        fns["peft wide"] = fwd(peft, xw, adapter_names=wide)
        for name, m in ours.items():
            fns[f"{name} wide"] = fwd(m, xw, task_ids=wide)
    times = interleaved(fns, args.repeats, sync)
    for m in ours.values():
        m.clear_task()
    med = {k: statistics.median(v) for k, v in times.items()}
    tb = med["base"]
    ms = lambda s: f"{1000 * s:.0f} ms"  # noqa: E731

    def row(what: str, key: str, base_key: str = "base", switch: str = "—", memory: str = "—") -> None:
        t = med[key]
        over = "—" if key == base_key else f"{1000 * overhead(times, key, base_key):+.0f} ms"
        rows.append([str(n_tasks), what, ms(t), f"{t / med[base_key]:.2f}", over, switch, memory])

    n_mixed = len(set(batch))
    row("base model", "base")
    per_peft = lora_bytes(dirs[0]) * torch.empty(0, dtype=dt).element_size()
    sw = switch_latency(peft.set_adapter, "t0", "t1", 100)
    row("PEFT, one adapter", "peft one", switch=f"{sw * 1e6:.0f} µs", memory=f"{per_peft / 1024:.0f} KiB")
    row(f"PEFT, mixed batch ({n_mixed} tasks)", "peft mixed")
    for name, m in ours.items():
        sw = switch_latency(m.set_task, "t0", "t1", 1000)
        mem = m.task_bytes("t0")
        disk = stored_task_bytes(subs[name], "t0")
        row(f"ours ({name}), one task", f"{name} one", switch=f"{sw * 1e6:.1f} µs",
            memory=f"{mem / 1024:.0f} KiB ({disk / 1024:.0f} KiB on disk); shared {m.shared_bytes() / 2**20:.1f} MiB once")
        row(f"ours ({name}), mixed batch ({n_mixed} tasks)", f"{name} mixed")
        m.clear_task()
    if wide_rows != args.batch:
        shape = f"{wide_rows}×{wide_seq}"
        row(f"base model, {shape}", "base wide", "base wide")
        row(f"PEFT, mixed batch ({wide_rows} tasks, {shape})", "peft wide", "base wide")
        for name in ours:
            row(f"ours ({name}), mixed batch ({wide_rows} tasks, {shape})", f"{name} wide", "base wide")
    del peft, ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="CUDA, bf16, hidden 4096, 8 layers")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--tasks", default="8,64", help="comma-separated T values")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.002, help="per-task noise around the common spaces")
    p.add_argument("--max-error", type=float, default=0.05, help="subspace error target")
    p.add_argument("--repeats", type=int, default=9, help="rounds (every configuration timed once per round)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = p.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available")
    args.device = "cuda" if args.gpu else "cpu"
    args.dtype = torch.bfloat16 if args.gpu else torch.float32
    hidden = args.hidden or (4096 if args.gpu else 1024)
    layers = args.layers or (8 if args.gpu else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = build_base(hidden, layers, args.device, args.dtype)
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="vlora-inference-bench-") as tmp:
        for n in [int(v) for v in args.tasks.split(",")]:
            run(args, n, base, Path(tmp), rows)
    print(f"\n{args.device}, {str(args.dtype).replace('torch.', '')}, Llama-shaped hidden {hidden}, {layers} layers, "
          f"q/v LoRA r{args.rank}, batch {args.batch}×{args.seq}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds; overhead = median over rounds of (this − base model) in the same round\n")
    head = ["T", "what", "forward", "× base", "overhead", "switch task", "memory per added task"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
