"""Hub access against a local fake Hub (tests/hubserver.py); nothing leaves 127.0.0.1.

``huggingface_hub`` reads its endpoint, cache folder and offline flag once, at
import, into ``huggingface_hub.constants``; the ``hub`` fixture sets both the
environment variables and those constants, so the library and the engine see
the same fake Hub and the same temporary cache.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.utils._cache_manager  # noqa: F401  (imported before the fixture moves the cache, as in an app)
import pytest
import torch
from hubserver import FakeHub

from engine.constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from engine.errors import AdapterFormatError, HubError
from engine.io.hub import download_adapter, list_cached_adapters, load_adapter_from_hub, search_hub_adapters
from engine.io.local import load_adapter


def _files(folder: Path, *extra: str) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, *extra)}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as C

    home = tmp_path / "hf_home"
    cache = home / "hub"
    with FakeHub() as server:
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        patches = {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(cache),
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "HF_XET_CACHE": str(home / "xet"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
            "HF_HUB_OFFLINE": False,
        }
        for name, value in patches.items():
            if hasattr(C, name):
                monkeypatch.setattr(C, name, value)
        server.cache = cache
        yield server


def _go_offline(monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)


def _same_tensors(a, b) -> bool:
    return a.layer_names == b.layer_names and all(
        torch.equal(a.lora_a[m], b.lora_a[m]) and torch.equal(a.lora_b[m], b.lora_b[m]) for m in a.layer_names
    )


def test_load_by_repo_id_fetches_only_adapter_files(hub, peft_adapter_dir):
    files = _files(peft_adapter_dir, "README.md")
    files["pytorch_model.bin"] = b"not to be fetched"
    files["tokenizer.json"] = b"{}"
    sha = hub.add_repo("org/lora-a", files)
    w = load_adapter_from_hub("org/lora-a")
    assert _same_tensors(w, load_adapter(peft_adapter_dir))
    assert w.name == "lora-a" and w.source == "hf://org/lora-a"
    assert sorted(set(hub.file_requests())) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    assert hub.file_requests("GET") == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    # the weights are asked for at the commit the config came from
    resolved = [r.path for r in hub.requests if r.path.endswith(ADAPTER_WEIGHTS_NAME)]
    assert resolved and all(f"/resolve/{sha}/" in p for p in resolved)
    snapshot = hub.cache / "models--org--lora-a" / "snapshots" / sha
    assert sorted(p.name for p in snapshot.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]


def test_load_by_branch_and_by_commit(hub, peft_family_dirs):
    first = hub.add_repo("org/lora", _files(peft_family_dirs[0]))
    second = hub.add_repo("org/lora", _files(peft_family_dirs[1]))  # main moves on
    hub.add_repo("org/lora", _files(peft_family_dirs[2]), branch="dev")
    assert first != second

    main = load_adapter_from_hub("org/lora")
    assert _same_tensors(main, load_adapter(peft_family_dirs[1]))
    dev = load_adapter_from_hub("org/lora", "dev")
    assert _same_tensors(dev, load_adapter(peft_family_dirs[2]))
    assert dev.source == "hf://org/lora@dev"
    old = load_adapter_from_hub("org/lora", first)
    assert _same_tensors(old, load_adapter(peft_family_dirs[0]))
    assert old.source == f"hf://org/lora@{first}"
    assert any(f"/resolve/{first}/" in r.path for r in hub.requests)


def test_offline_mode_is_served_from_cache(hub, peft_adapter_dir, monkeypatch):
    sha = hub.add_repo("org/lora", _files(peft_adapter_dir))
    online = load_adapter_from_hub("org/lora")
    n = len(hub.requests)
    _go_offline(monkeypatch)
    offline = load_adapter_from_hub("org/lora")
    by_sha = load_adapter_from_hub("org/lora", sha)
    assert _same_tensors(online, offline) and _same_tensors(online, by_sha)
    assert len(hub.requests) == n  # not one request


def test_offline_and_not_cached_is_hub_error(hub, peft_adapter_dir, monkeypatch):
    hub.add_repo("org/lora", _files(peft_adapter_dir))
    _go_offline(monkeypatch)
    with pytest.raises(HubError) as ei:
        load_adapter_from_hub("org/lora")
    assert "hf://org/lora" in str(ei.value) and "offline" in str(ei.value)
    assert hub.file_requests() == []


def test_missing_repo_is_hub_error(hub):
    with pytest.raises(HubError) as ei:
        load_adapter_from_hub("org/nothing-here")
    assert "hf://org/nothing-here" in str(ei.value) and "not found" in str(ei.value)


def test_missing_revision_is_hub_error(hub, peft_adapter_dir):
    hub.add_repo("org/lora", _files(peft_adapter_dir))
    with pytest.raises(HubError) as ei:
        load_adapter_from_hub("org/lora", "no-such-branch")
    assert "hf://org/lora@no-such-branch" in str(ei.value) and "revision not found" in str(ei.value)


def test_unreachable_hub_is_hub_error(hub, monkeypatch):
    import types

    import huggingface_hub.utils._http as hf_http

    sleeps: list[float] = []
    # huggingface_hub retries with back-off (1 s, 2 s, 4 s, ...) before giving up; skip the waiting
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=sleeps.append))
    hub.stop()  # nothing listens on the port any more
    with pytest.raises(HubError) as ei:
        load_adapter_from_hub("org/lora")
    assert "hf://org/lora" in str(ei.value)
    assert "reached" in str(ei.value) or "unreachable" in str(ei.value)
    assert sleeps  # it did retry, then gave up


def test_bin_only_repo_is_format_error(hub, peft_adapter_dir, tmp_path):
    marker = tmp_path / "UNPICKLED"
    hub.add_repo(
        "org/old-lora",
        {ADAPTER_CONFIG_NAME: (peft_adapter_dir / ADAPTER_CONFIG_NAME).read_bytes(), "adapter_model.bin": b"\x80\x04junk"},
    )
    with pytest.raises(AdapterFormatError) as ei:
        load_adapter_from_hub("org/old-lora")
    assert "hf://org/old-lora" in str(ei.value) and ADAPTER_WEIGHTS_NAME in str(ei.value) and ".bin" in str(ei.value)
    assert "adapter_model.bin" not in hub.file_requests()
    assert not marker.exists()


def test_repo_without_adapter_config_is_format_error(hub):
    hub.add_repo("org/full-model", {"config.json": b"{}", "model.safetensors": b"x"})
    with pytest.raises(AdapterFormatError) as ei:
        load_adapter_from_hub("org/full-model")
    assert ADAPTER_CONFIG_NAME in str(ei.value) and "hf://org/full-model" in str(ei.value)


def test_bad_repo_id_is_value_error(hub):
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        load_adapter_from_hub("../etc/passwd")
    assert hub.requests == []


def test_download_adapter_returns_snapshot(hub, peft_adapter_dir):
    sha = hub.add_repo("org/lora", _files(peft_adapter_dir))
    folder = download_adapter("org/lora")
    assert folder.name == sha
    assert (folder / ADAPTER_WEIGHTS_NAME).read_bytes() == (peft_adapter_dir / ADAPTER_WEIGHTS_NAME).read_bytes()


def test_search_uses_models_api(hub):
    hub.add_listing("org/sql-lora", downloads=10, likes=2, tags=("peft", "base_model:meta-llama/Llama-3-8B", "lora"))
    hub.add_listing("org/sql-lora-v2", downloads=99, tags=("peft",))
    hub.add_listing("other/sql-lora", downloads=50, tags=("peft",))
    hub.add_listing("org/sql-full-model", downloads=1000, tags=("transformers",))
    hub.add_listing("org/chat-lora", downloads=5, tags=("peft",))

    found = search_hub_adapters("sql")
    assert [r.repo_id for r in found] == ["org/sql-lora-v2", "other/sql-lora", "org/sql-lora"]
    assert found[2].downloads == 10 and found[2].likes == 2 and found[2].base_model == "meta-llama/Llama-3-8B"
    assert found[2].last_modified is not None
    query = [r for r in hub.requests if r.path == "/api/models"][-1].query
    assert query["filter"] == ["peft"] and query["search"] == ["sql"] and query["sort"] == ["downloads"]

    assert [r.repo_id for r in search_hub_adapters("sql", author="org")] == ["org/sql-lora-v2", "org/sql-lora"]
    assert [r.repo_id for r in search_hub_adapters("", limit=2)] == ["org/sql-lora-v2", "other/sql-lora"]
    assert search_hub_adapters("nothing-matches") == []


def test_offline_search_is_hub_error(hub, monkeypatch):
    hub.add_listing("org/sql-lora", tags=("peft",))
    _go_offline(monkeypatch)
    with pytest.raises(HubError, match="offline"):
        search_hub_adapters("sql")
    assert not any(r.path == "/api/models" for r in hub.requests)


def test_offline_flag_set_only_in_huggingface_hub(hub, peft_adapter_dir, monkeypatch):
    import huggingface_hub.constants as C

    hub.add_repo("org/lora", _files(peft_adapter_dir))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)  # read from the environment before this process changed it
    with pytest.raises(HubError, match="not in the local cache and offline mode"):
        load_adapter_from_hub("org/lora")
    with pytest.raises(HubError, match="unavailable in offline mode"):
        search_hub_adapters("sql")
    assert hub.requests == []


def test_list_cached_adapters(hub, peft_family_dirs):
    """The default cache is the one huggingface_hub uses now (HF_HUB_CACHE), not the one seen at import."""
    assert list_cached_adapters() == []
    sha = hub.add_repo("org/lora", _files(peft_family_dirs[0]))
    hub.add_repo("org/other", {"config.json": b"{}"})
    load_adapter_from_hub("org/lora")
    cached = list_cached_adapters()
    assert [(c.repo_id, c.revision, c.refs) for c in cached] == [("org/lora", sha, ("main",))]
    assert cached[0].path == hub.cache / "models--org--lora" / "snapshots" / sha
    assert cached[0].size_on_disk > 0
    assert load_adapter(cached[0].path).layer_names == load_adapter(peft_family_dirs[0]).layer_names
    assert list_cached_adapters(hub.cache) == cached


def test_search_gives_up_after_timeout(hub, monkeypatch):
    """A Hub that accepts the connection and never answers: a HubError naming the timeout, not a hang."""
    import socket

    import huggingface_hub.constants as C

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections wait in the backlog; nothing ever answers them
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(C, "ENDPOINT", url)
    try:
        with pytest.raises(HubError, match="did not answer within 1 s"):
            search_hub_adapters("sql", timeout=1)
    finally:
        silent.close()
    hub.add_listing("org/sql-lora", tags=("peft",))
    monkeypatch.setattr(C, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert [r.repo_id for r in search_hub_adapters("sql", timeout=60)] == ["org/sql-lora"]
