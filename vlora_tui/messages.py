"""Typed messages that workers and widgets post to the app."""

from __future__ import annotations

from textual.message import Message


class JobProgress(Message):
    """Progress of a running job (posted from its worker thread).

    A newer progress message of the same job replaces one still queued, so a
    fast engine cannot flood the UI.
    """

    def __init__(self, job_id: str, step: int, total: int, text: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.step = step
        self.total = total
        self.text = text

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobProgress) and message.job_id == self.job_id


class HubSearchDone(Message):
    """A Hub search finished: ``repos`` on success, else ``error`` says why."""

    def __init__(self, query: str, repos: list, error: str | None = None) -> None:
        super().__init__()
        self.query = query
        self.repos = repos
        self.error = error


class CachedAdaptersListed(Message):
    """The local Hugging Face cache was scanned."""

    def __init__(self, adapters: list) -> None:
        super().__init__()
        self.adapters = adapters


class AddToCollection(Message):
    """A widget asks the app to add adapter specs to the working collection."""

    def __init__(self, specs: list[str]) -> None:
        super().__init__()
        self.specs = specs
