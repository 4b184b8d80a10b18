"""How many pushes the receiver applies at once, and which waiting one goes next.

Not the per-message *gate* of the glossary (the minimum interval between two checks): a
bound on the receiver's concurrent stores and settles, final statuses first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import anyio

__all__ = ["APPLY_THREADS", "ApplySlots"]

# Pushes stored (and settled) at once. The work is short and mostly Python: more threads
# only take turns on the GIL, so that every push in a burst finishes late; with a few, a
# burst is served in arrival order, final statuses first (see ApplySlots).
APPLY_THREADS: Final = 4


class ApplySlots:
    """At most ``slots`` pushes applied at once; a waiting final status goes first.

    A final push settles its message and fires the callbacks, which someone waits for; a
    non-final one only refreshes the cache. When a send starts, the provider pushes a
    "processing" for every message at once, and the first finals among them should not
    wait behind all of it. Pushes of one kind keep their arrival order. Under a steady
    stream of finals the others wait longest, and lose least: a final status supersedes
    them. Lives on one event loop: the receiver's.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        # Waiters only exist while no slot is free: a released slot passes to the first
        # waiting final push, else to the first other one, else back to the pool.
        self._finals: deque[anyio.Event] = deque()
        self._others: deque[anyio.Event] = deque()

    @asynccontextmanager
    async def slot(self, *, final: bool) -> AsyncIterator[None]:
        """Hold one slot for the body of the ``async with``."""
        await self._acquire(final)
        try:
            yield
        finally:
            self._release()

    @property
    def waiting(self) -> tuple[int, int]:
        """Pushes waiting for a slot: ``(final, other)``."""
        return len(self._finals), len(self._others)

    async def _acquire(self, final: bool) -> None:
        if self._free:
            self._free -= 1
            return
        queue = self._finals if final else self._others
        wake = anyio.Event()
        queue.append(wake)
        try:
            await wake.wait()
        except BaseException:  # cancelled (the client went away, the server stops)
            if wake.is_set():
                self._release()  # handed a slot it will not use: pass it on
            else:
                queue.remove(wake)
            raise

    def _release(self) -> None:
        for queue in (self._finals, self._others):
            if queue:
                queue.popleft().set()
                return
        self._free += 1
