"""The typed keys the balancer's aiohttp apps hold shared objects under.

Its own module, below the handlers and above the :class:`Balancer`: the app factories
(``app``) set them and the handlers read them, so a handler never imports ``app`` and
``app`` imports the handlers at the top of the module. Keys that one module sets and
reads (``http_util``'s body limit and CORS policy, ``management_api``'s SSE wakers)
stay in that module.
"""

from __future__ import annotations

from aiohttp import web

from paddler_balancer.service import Balancer

BALANCER_KEY: web.AppKey[Balancer] = web.AppKey("balancer", Balancer)
"""How every handler finds the pool's :class:`Balancer`."""
