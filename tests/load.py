"""A load generator for the asyncio test apps: N concurrent clients per path, until stopped."""

from __future__ import annotations

import asyncio
import threading

import httpx


class Load:
    """`Load(base_url, {"/cpu": 20, ...})`: that many clients per path, each sending one request
    after another, on a thread of its own; `stop()` ends them and returns requests done per path."""

    def __init__(self, base: str, clients: dict[str, int]) -> None:
        self.base = base
        self.clients = clients
        self.done = {p: 0 for p in clients}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=sum(self.clients.values()) + 10)
        async with httpx.AsyncClient(base_url=self.base, timeout=30, limits=limits) as c:
            async def one(path: str) -> None:
                while not self._stop.is_set():
                    try:
                        r = await c.get(path)
                        if r.status_code == 200:
                            self.done[path] += 1
                        else:
                            self.errors += 1
                    except httpx.HTTPError:
                        self.errors += 1
                        await asyncio.sleep(0.05)
            await asyncio.gather(*(one(p) for p, n in self.clients.items() for _ in range(n)))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(timeout=60)
        return dict(self.done)
