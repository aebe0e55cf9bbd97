"""The web view: workflows, executions and one execution, live, in a browser.

``python -m reactive ui`` serves it alone against any NATS URL; ``serve --ui-port N``
beside an engine. It needs no workflow code: it reads what engines announce in the meta
bucket, like the other commands. See :mod:`reactive.ui.app` and :mod:`reactive.ui.index`.
"""

from __future__ import annotations

from reactive.ui.app import PAGE_SIZE, UIConfig, create_app
from reactive.ui.index import ExecutionIndex

__all__ = ["PAGE_SIZE", "ExecutionIndex", "UIConfig", "create_app"]
