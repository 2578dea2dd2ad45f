"""What the jobs that run a base model share (``compare``, ``train``): loading it from a local folder
with transformers, its task type, its tokenizer (or a stand-in), and reading JSONL data.

transformers is optional: a job that needs it and finds it missing says so in one line.
Torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: PEFT task types a job can run, and the transformers auto class of each.
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
}

#: Prompts ``compare`` runs when none are given (and the base model has a tokenizer).
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Translate to German: The weather is nice today.",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village by the sea,",
    "Summarize: Low-rank adapters add a small trainable update to each weight matrix.",
    "The patient reported mild headaches and",
    "SELECT name, email FROM users WHERE",
)


def require_transformers(job: str) -> Any:
    """``import transformers`` (its progress bars and advice silenced: a job reports its own progress),
    or a one-line error saying that ``job`` needs it."""
    try:
        import transformers
    except ImportError as exc:  # an optional dependency
        from ..errors import VloraError

        raise VloraError(f"{job} needs transformers to load the base model: pip install transformers",
                         title="transformers missing") from exc
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No library warnings (deprecations inside transformers/PEFT) on a job's stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_model_dir(path: str | Path) -> Path:
    """A local transformers model folder (holds ``config.json``); ``ValueError`` naming it otherwise."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"base_model: {p}: no such folder (a local folder written by save_pretrained)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ValueError(f"base_model: {p}: not a transformers model folder (no config.json)")
    return p


def model_config(path: Path) -> dict[str, Any]:
    """The base model's ``config.json`` as a dict."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"base_model: {path / 'config.json'}: not readable JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"base_model: {path / 'config.json'}: not a JSON object")
    return cfg


def task_type_of(path: Path, named: list[str | None]) -> str:
    """The task type to load the base model as: the adapters' ``task_type`` if they name one,
    else the model's ``architectures`` (``…ForSequenceClassification`` → ``SEQ_CLS``), else ``CAUSAL_LM``.

    Raises:
        ValueError: the adapters name different task types, or one no job runs.
    """
    kinds = sorted({str(t) for t in named if t})
    if len(kinds) > 1:
        raise ValueError(f"task_type: the adapters name different task types ({', '.join(kinds)}); compare them separately")
    if kinds:
        if kinds[0] not in AUTO_CLASSES:
            raise ValueError(f"task_type: {kinds[0]} is not supported here (supported: {', '.join(AUTO_CLASSES)})")
        return kinds[0]
    archs = [str(a) for a in model_config(path).get("architectures") or []]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "SEQ_CLS"
    if any(a.endswith("ForTokenClassification") for a in archs):
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def load_base_model(path: Path, task_type: str, job: str) -> Any:
    """The base model from a local folder, in float32, in eval mode (no download)."""
    import torch

    transformers = require_transformers(job)
    cls = getattr(transformers, AUTO_CLASSES[task_type])
    try:
        with quiet():
            model = cls.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"base_model: {path}: transformers cannot load it as {task_type} ({exc})") from exc
    model.eval()
    return model


def load_tokenizer(path: Path) -> Any | None:
    """The tokenizer saved in the base model folder, or ``None`` when the folder has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if not any((path / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"base_model: {path}: its tokenizer does not load ({exc})") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def vocab_size(model: Any) -> int:
    return int(getattr(model.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)


def byte_ids(text: str, vocab: int, max_length: int) -> list[int]:
    """A tokenizer stand-in for a model folder without one: UTF-8 bytes, folded into the vocabulary (ids ≥ 1)."""
    return [1 + b % max(1, vocab - 1) for b in text.encode("utf-8")][:max_length] or [1]


def encode(texts: list[str], tokenizer: Any | None, vocab: int, max_length: int) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` for ``texts``, right-padded (pad id 0 without a tokenizer)."""
    import torch

    if tokenizer is not None:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return enc["input_ids"], enc["attention_mask"]
    rows = [byte_ids(t, vocab, max_length) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def read_jsonl(path: str | Path, fields: tuple[str, ...], param: str = "data") -> list[dict[str, Any]]:
    """Rows of a JSONL file, each an object holding ``fields``; every bad line named in one error.

    Raises:
        ValueError: the file is missing, empty, or lines are not JSON objects with the fields.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{param}: {p}: no such file")
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{param}: {p}: not readable as UTF-8 text ({exc})") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            problems.append(f"line {n} is not JSON")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n} is not a JSON object")
            continue
        missing = [f for f in fields if f not in obj or obj[f] is None]
        if missing:
            problems.append(f"line {n} has no {missing[0]!r}")
            continue
        if not isinstance(obj[fields[0]], str) or not obj[fields[0]].strip():
            problems.append(f"line {n}: {fields[0]!r} is not a non-empty string")
            continue
        rows.append(obj)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{param}: {p}: " + "; ".join(problems[:3]) + more)
    if not rows:
        raise ValueError(f"{param}: {p}: no examples (one JSON object a line, with {', '.join(map(repr, fields))})")
    return rows
