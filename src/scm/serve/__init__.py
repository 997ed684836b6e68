"""`scm serve`: few-step generation in the browser, the image following the controls as they move.

`scm.serve.models` holds what is served of a run (allowed steps, classes, prompts, guidance; request validation; one
generation as PNG), with no web framework; `scm.serve.app` is the Starlette app, the per-model worker that runs
one generation at a time and drops superseded requests, and the uvicorn server. Starlette and uvicorn are
optional (`pip install scm[serve]`) and imported only when an app or a server is made (`require()` says whether
they are there).
"""

from scm.serve.app import bind, create_app, default_allowed_hosts, make_server, require, url_of
from scm.serve.models import ServedModel, check_pair

__all__ = ["ServedModel", "bind", "check_pair", "create_app", "default_allowed_hosts", "make_server", "require",
           "url_of"]
