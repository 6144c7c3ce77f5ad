"""The chat's event loop: one loop for all of a chat's coroutines, Ctrl-C cancels the running one."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any


class _Runner:
    """asyncio.Runner for Python 3.10: one loop for many run() calls; Ctrl-C cancels the running one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        pending = asyncio.all_tasks(self.loop)
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def run(self, coro: Any) -> Any:
        task = self.loop.create_task(coro)
        try:
            return self.loop.run_until_complete(task)
        except KeyboardInterrupt:
            task.cancel()
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(task)
            raise


def _block_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def keep_sigint_on_main_thread(runner: Any) -> None:
    """Worker threads (aiohttp's name lookups) block SIGINT, so a Ctrl-C at the prompt is
    delivered to the main thread, whose readline then raises KeyboardInterrupt at once."""
    import concurrent.futures

    get_loop = getattr(runner, "get_loop", None)
    if get_loop is not None:
        get_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="chat-io", initializer=_block_sigint))


def new_runner() -> Any:
    """asyncio.Runner where there is one (3.11+), else the same for 3.10."""
    return asyncio.Runner() if hasattr(asyncio, "Runner") else _Runner()
