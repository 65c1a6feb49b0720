"""The ClientApp Flower runs at every site (``client.app:app`` in pyproject.toml).

This module imports no torch and no site code: Flower's simulation process loads it (and
the ServerApp, under one import lock) before it starts Ray, and a SuperNode loads it before
its first message, so what it imports is paid on their start-up path (~1 s for torch alone
on a 2-core machine). The handlers are :mod:`client.site_app`'s; :class:`SiteClientApp`
builds them when the first message arrives and hands every message to them. Deployed
SuperNodes name their site in the node config; Flower's simulation numbers its nodes.
"""

from __future__ import annotations

import threading

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

_BUILDING = threading.Lock()


class SiteClientApp(ClientApp):
    """A ClientApp whose handlers (``client.site_app``) are imported on the first message.

    Flower's simulation pickles the app for its Ray actors: the pickle carries no handlers
    (nor a lock), and each actor builds its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self._site_app: ClientApp | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_site_app": None}

    @property
    def site_app(self) -> ClientApp:
        """The app with the handlers, built once."""
        if self._site_app is None:
            with _BUILDING:
                if self._site_app is None:
                    from client.site_app import build_client_app, site_from_context

                    self._site_app = build_client_app(site_from_context)
        return self._site_app

    def __call__(self, message: Message, context: Context) -> Message:
        return self.site_app(message, context)


app = SiteClientApp()
