"""The web role: REST API, OpenAI- and Ollama-compatible APIs, and the pages.

Files:

- ``role.py``: :class:`WebRole`, the role contract (``run`` binds the HTTP
  server and reports its port);
- ``site.py``: :class:`~p2pinfer.web.site.WebSite`, the app and what it is
  built from (settings, upstream, CSRF key), whatever process serves it;
- ``settings.py``: the ``[web]`` table (``host``, ``port`` from
  ``WEB_SERVICE_PORT``, body limit, timeouts, cookies);
- ``server.py``: the one place Hypercorn (trio worker) is set up;
- ``app.py``: the ASGI app: routes, per-dialect error handlers, middleware
  (request metrics, security headers, body limit);
- ``upstream.py``: RPC to auth, gateway and metrics nodes (this node first),
  the inference stream, the cached model catalogue, what the pages read of
  the node's ledger; ``WebUpstream`` is all the app uses of the node (the
  app itself runs on anyio, so on trio or asyncio alike);
- ``api.py``: the REST API (``/api/auth/*``, ``/api/inference``,
  ``/api/models``, ``/api/usage``, ``/api/quota``, ``/api/health``);
- ``openai_api.py``: ``/v1/models``, ``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses`` (the latter
  translated by ``openai_responses.py``);
- ``ollama_api.py``: ``/api/chat``, ``/api/generate``, ``/api/tags``,
  ``/api/show``, ``/api/ps``, ``/api/version``, ``/api/embed``,
  ``/api/embeddings``;
- ``privacy.py``: data export and account erasure (REST and the account page);
- ``streaming.py``: one streaming response for the three dialects (NDJSON,
  SSE), cancelling the request when the client goes away;
- ``credentials.py``: API keys and session tokens from HTTP headers;
- ``responses.py``: errors as JSON in each dialect, with ``Retry-After``;
- ``inputs.py``: JSON bodies, forms, the client's address;
- ``pages.py``, ``sessions.py``, ``templating.py``, ``charts.py``: the
  server-rendered pages, cookie sessions, the Jinja2 environment
  (autoescaping) and the dashboard's inline SVG charts;
- ``security.py``: security headers, body limit, CSRF tokens;
- ``tls.py``: HTTPS certificates (checked, or self-signed for a LAN) and the
  plain-HTTP listener that redirects to HTTPS;
- ``openapi.py``: the OpenAPI document (``/openapi.json``, ``/docs``);
- ``templates/``, ``static/``: the pages' HTML and stylesheet.

The HTTP surface is described in ``docs/http-api.md``.
"""

from __future__ import annotations

from .role import WebRole as WebRole
from .settings import WebSettings as WebSettings

__all__ = ["WebRole", "WebSettings"]
