"""The admin endpoint (issue 10): metrics, a session list, a status page, and the
``tether status`` / ``tether kill`` commands that read it. Imported only when used: it
brings aiohttp and prometheus-client."""

from __future__ import annotations

from .endpoint import AdminEndpoint, serve_admin

__all__ = ["AdminEndpoint", "serve_admin"]
