"""The base of the app's screens: a typed ``app`` (after Posting's ``cast("Posting", self.app)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen

if TYPE_CHECKING:  # pragma: no cover
    from ..app import VloraApp


class VloraScreen(Screen):
    """A screen of :class:`~vlora_tui.app.VloraApp`: ``self.app`` is typed as the app, state and actions included."""

    @property
    def app(self) -> VloraApp:  # type: ignore[override]
        """The running :class:`~vlora_tui.app.VloraApp`."""
        return cast("VloraApp", super().app)
