"""Per-module figures of one adapter's update ΔW (norms, spectrum, effective ranks), through r×r products.

Pure math on a loaded adapter; the ``inspect`` and ``validate`` jobs report these.
"""

from __future__ import annotations

import math
from typing import Any


def module_figures(w: Any, m: str) -> dict[str, Any]:
    """Norms and spectrum of one module's update, through r×r products only.

    ``‖ΔW‖_F² = s²·tr((BᵀB)(AAᵀ))``; the singular values of ``B·A`` are those of
    ``R_B·R_Aᵀ`` where ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``.
    """
    import torch

    a = w.lora_a[m].double()
    b = w.lora_b[m].double()
    s = float(w.scale(m))
    finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
    out_f, in_f = w.shapes(m)
    fig: dict[str, Any] = {
        "name": m,
        "rank": int(a.shape[0]),
        "in_features": int(in_f),
        "out_features": int(out_f),
        "dtype": str(w.lora_a[m].dtype).replace("torch.", ""),
        "scale": s,
        "finite": finite,
    }
    if not finite:
        fig.update(norm_a=None, norm_b=None, norm_delta=None, singular_values=[], stable_rank=None, effective_rank=None)
        return fig
    norm_a = float(torch.linalg.norm(a))
    norm_b = float(torch.linalg.norm(b))
    r = a.shape[0]
    if r == 0:
        sv = torch.zeros(0, dtype=torch.float64)
    else:
        rb = torch.linalg.qr(b, mode="r")[1]
        ra = torch.linalg.qr(a.T, mode="r")[1]
        sv = torch.linalg.svdvals(rb @ ra.T) * abs(s)
    fro2 = float((sv**2).sum())
    top = float(sv[0]) if sv.numel() else 0.0
    if fro2 > 0:
        p = (sv**2) / fro2
        p = p[p > 0]
        eff = float(torch.exp(-(p * p.log()).sum()))
    else:
        eff = 0.0
    fig.update(
        norm_a=norm_a,
        norm_b=norm_b,
        norm_delta=math.sqrt(fro2),
        singular_values=[float(x) for x in sv],
        stable_rank=(fro2 / top**2) if top > 0 else 0.0,
        effective_rank=eff,
    )
    return fig
