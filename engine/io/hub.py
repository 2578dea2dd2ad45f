"""Hugging Face Hub access, through ``huggingface_hub`` only.

``huggingface_hub`` honours ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``
and its local cache; nothing here talks to the network any other way.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from ..errors import AdapterFormatError, HubError
from .scan import hub_spec_label, parse_hub_spec, validate_repo_id


@dataclass(frozen=True)
class HubRepo:
    """One Hub model repo as the browser lists it."""

    repo_id: str
    downloads: int | None = None
    likes: int | None = None
    last_modified: str | None = None
    tags: tuple[str, ...] = ()
    base_model: str | None = None


@dataclass(frozen=True)
class CachedAdapter:
    """An adapter already in the local Hugging Face cache."""

    repo_id: str
    revision: str
    path: Path
    refs: tuple[str, ...] = ()
    size_on_disk: int = 0


def hub_offline() -> bool:
    """True when offline mode is on (``HF_HUB_OFFLINE``, or ``huggingface_hub``'s own setting).

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import; it is asked too
    so that both agree however the mode was set.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a declared dependency
        return False
    is_offline = getattr(constants, "is_offline_mode", None)  # 1.x; 0.x has only the constant
    return bool(is_offline()) if is_offline is not None else bool(getattr(constants, "HF_HUB_OFFLINE", False))


@contextlib.contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    """Turn ``huggingface_hub`` and network exceptions into one-line ``HubError``s."""
    from huggingface_hub import errors as e

    try:
        yield
    except e.GatedRepoError as exc:
        raise HubError(f"{what}: gated repo; accept its terms on the Hub and set HF_TOKEN") from exc
    except e.RepositoryNotFoundError as exc:
        raise HubError(f"{what}: repository not found (or private: set HF_TOKEN)") from exc
    except e.RevisionNotFoundError as exc:
        raise HubError(f"{what}: revision not found") from exc
    except e.LocalEntryNotFoundError as exc:
        mode = "offline mode (HF_HUB_OFFLINE)" if hub_offline() else "the Hub cannot be reached"
        raise HubError(f"{what}: not in the local cache and {mode}") from exc
    except (e.EntryNotFoundError, getattr(e, "RemoteEntryNotFoundError", e.EntryNotFoundError)) as exc:
        raise HubError(f"{what}: file not found in the repo ({exc.__class__.__name__})") from exc
    except e.HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise HubError(f"{what}: Hub request failed ({first})") from exc
    except (OSError, ConnectionError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise HubError(f"{what}: Hub unreachable ({exc.__class__.__name__}: {exc})") from exc
    except Exception as exc:  # httpx transport errors and friends
        if exc.__class__.__module__.split(".")[0] in {"httpx", "httpcore", "requests", "urllib3"}:
            raise HubError(f"{what}: Hub unreachable ({exc.__class__.__name__})") from exc
        raise


def download_adapter(repo_id: str, revision: str | None = None, *, token: str | None = None) -> Path:
    """Fetch only ``adapter_config.json`` and ``adapter_model.safetensors`` into the cache.

    Returns the snapshot folder holding both.

    Raises:
        ValueError: malformed repo id.
        HubError: missing repo/revision/file, offline and not cached, network failure.
    """
    validate_repo_id(repo_id)
    what = hub_spec_label(repo_id, revision)
    cfg = _fetch(repo_id, ADAPTER_CONFIG_NAME, revision, token, what, "not a PEFT adapter repo")
    # Pin the weights to the commit the config came from, so a push between the
    # two requests cannot pair one commit's config with another's weights.
    commit = Path(cfg).parent.name
    weights = _fetch(
        repo_id, ADAPTER_WEIGHTS_NAME, commit, token, what, "pickle .bin weights are refused, never unpickled"
    )
    folder = Path(cfg).parent
    if Path(weights).parent != folder:  # pragma: no cover - same commit, same snapshot
        raise HubError(f"{what}: config and weights resolved to different snapshots")
    return folder


def _fetch(repo_id: str, filename: str, revision: str | None, token: str | None, what: str, hint: str) -> str:
    """``hf_hub_download`` one file; a file the repo lacks is an ``AdapterFormatError`` naming it."""
    from huggingface_hub import errors as e
    from huggingface_hub import hf_hub_download

    missing = (e.EntryNotFoundError, getattr(e, "RemoteEntryNotFoundError", e.EntryNotFoundError))
    with _hub_errors(what):
        try:
            return hf_hub_download(repo_id, filename, revision=revision, token=token)
        except e.LocalEntryNotFoundError:
            raise  # not cached while offline: a HubError, below
        except missing as exc:
            raise AdapterFormatError(f"{what}: no {filename} in the repo ({hint})") from exc


def load_adapter_from_hub(repo_id: str, revision: str | None = None, *, token: str | None = None) -> Any:
    """Load a PEFT LoRA adapter from the Hub (or the cache when offline).

    Returns:
        ``LoRAWeights`` named after the repo, ``source`` set to ``hf://repo@rev``.
    """
    from .local import load_adapter

    folder = download_adapter(repo_id, revision, token=token)
    w = load_adapter(folder, name=repo_id.split("/")[-1])
    w.source = hub_spec_label(repo_id, revision)
    return w


def search_hub_adapters(query: str = "", *, author: str | None = None, limit: int = 50, token: str | None = None,
                        timeout: float | None = None) -> list[HubRepo]:
    """Search Hub model repos tagged ``peft`` (LoRA adapters), most downloaded first.

    Args:
        query: Words to search for (empty: every adapter).
        author: Only this user's or organisation's repos.
        limit: At most this many repos.
        token: A Hub token (default: ``HF_TOKEN`` / the stored login).
        timeout: Give up after this many seconds, so that a dead network never hangs
            the caller (the request goes on in a daemon thread; its answer is dropped).

    Raises:
        HubError: offline mode, the Hub cannot be reached, or no answer within ``timeout``.
    """
    if hub_offline():
        raise HubError("Hub search is unavailable in offline mode (HF_HUB_OFFLINE is set); the local cache is listed instead")
    if timeout is None:
        return _search(query, author, limit, token)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["repos"] = _search(query, author, limit, token)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True, name="hub-search")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise HubError(f"the Hub did not answer within {timeout:.0f} s (offline? set HF_HUB_OFFLINE=1)")
    if "error" in box:
        raise box["error"]
    return box["repos"]


def _search(query: str, author: str | None, limit: int, token: str | None) -> list[HubRepo]:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with _hub_errors(f"Hub search {query!r}"):
        models = list(
            api.list_models(search=query or None, author=author, filter="peft", sort="downloads", limit=limit)
        )
    out = []
    for m in models:
        tags = tuple(getattr(m, "tags", None) or ())
        base = next((t.split(":", 1)[1] for t in tags if t.startswith("base_model:") and t.count(":") == 1), None)
        lm = getattr(m, "last_modified", None)
        out.append(HubRepo(m.id, getattr(m, "downloads", None), getattr(m, "likes", None), str(lm) if lm else None, tags, base))
    return out


def cached_adapter_files(spec: str) -> tuple[Path, Path] | None:
    """The config and weights of ``hf://org/repo[@rev]`` in the local cache, or ``None`` (never a request).

    Raises:
        ValueError: a malformed ``hf://`` id.
    """
    from huggingface_hub import try_to_load_from_cache

    s = parse_hub_spec(spec)
    found = [try_to_load_from_cache(s.repo_id, name, revision=s.revision) for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)]
    if not all(isinstance(f, str) for f in found):
        return None
    return Path(found[0]), Path(found[1])


def list_cached_adapters(cache_dir: str | Path | None = None) -> list[CachedAdapter]:
    """Adapters (model repos with an adapter config) already in the local HF cache."""
    from huggingface_hub import constants, scan_cache_dir

    # scan_cache_dir's own default is the HF_HUB_CACHE seen when huggingface_hub was imported
    cache_dir = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        info = scan_cache_dir(cache_dir)
    except Exception:  # no cache yet, or not readable
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            snap = Path(rev.snapshot_path)
            if (snap / ADAPTER_CONFIG_NAME).is_file() and (snap / ADAPTER_WEIGHTS_NAME).exists():
                found.append(CachedAdapter(repo.repo_id, rev.commit_hash, snap, tuple(sorted(rev.refs)), rev.size_on_disk))
    return sorted(found, key=lambda c: (c.repo_id, c.revision))
