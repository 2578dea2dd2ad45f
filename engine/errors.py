"""One exception hierarchy for the engine; every error carries a short title.

Front ends (the TUI and ``--batch``) show ``title`` as a heading and ``str(err)``
as the one-line message. Bad *arguments* raise ``ValueError``; failures of the
domain (a malformed file, adapters that cannot be combined, the Hub) raise a
``VloraError`` subclass.
"""

from __future__ import annotations


class VloraError(Exception):
    """Base of every domain error raised by the engine.

    Args:
        message: One line that names the file/key/task and what is wrong.
        title: Short heading for dialogs; defaults to the class's ``title``.
    """

    title: str = "vlora error"

    def __init__(self, message: str, title: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        return self.message


class AdapterFormatError(VloraError):
    """An adapter file or folder is missing, corrupt or not a LoRA adapter."""

    title = "Adapter format error"


class UnsupportedAdapterError(AdapterFormatError):
    """A valid PEFT adapter of a kind this tool does not handle (DoRA, embedding LoRA, …)."""

    title = "Unsupported adapter"


class IncompatibleAdaptersError(VloraError):
    """Adapters that cannot be combined (base model, modules, shapes differ)."""

    title = "Incompatible adapters"


class SubspaceFormatError(VloraError):
    """A saved subspace folder is missing files, corrupt, or fails its checksums."""

    title = "Subspace format error"


class UnknownTaskError(VloraError, KeyError):
    """A task id that the subspace does not hold."""

    title = "Unknown task"

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class HubError(VloraError):
    """The Hugging Face Hub could not be reached, or the repo/revision is missing."""

    title = "Hugging Face Hub error"


class OutputExistsError(VloraError):
    """An output path exists and ``force`` was not given."""

    title = "Output exists"


class ErrorTargetError(VloraError):
    """A change to a subspace would break the error target it was built with (refused unless allowed)."""

    title = "Error target broken"


class JobCancelled(VloraError):
    """A long operation stopped because its ``cancel`` event was set."""

    title = "Cancelled"

    def __init__(self, message: str = "cancelled by user", title: str | None = None) -> None:
        super().__init__(message, title)


class JobFailed(VloraError):
    """A job ended with an error in a worker (thread or process)."""

    title = "Job failed"


__all__ = [
    "AdapterFormatError",
    "HubError",
    "IncompatibleAdaptersError",
    "ErrorTargetError",
    "JobCancelled",
    "JobFailed",
    "OutputExistsError",
    "SubspaceFormatError",
    "UnknownTaskError",
    "UnsupportedAdapterError",
    "VloraError",
]
