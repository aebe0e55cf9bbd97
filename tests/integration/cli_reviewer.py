"""The plan-review example's simulated reviewer as a process: ``python cli_reviewer.py NATS_URL``.

Prints ``ready`` once it is subscribed to the review requests; stops on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio

from reactive import NatsBackend
from reactive.cli.demo import load_example

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plan_review.py"


async def main(url: str) -> None:
    plan_review = load_example(EXAMPLE)
    backend = NatsBackend(url)
    await backend.start()
    try:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                await tg.start(plan_review.reviewer_worker, backend)
                print("ready", flush=True)
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break
    finally:
        await backend.close()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
