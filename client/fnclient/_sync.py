"""The blocking client: :class:`AsyncClient` driven by a private event loop in a daemon thread.

Each method submits the async method's coroutine with ``run_coroutine_threadsafe`` and waits,
so the protocol logic exists once, and several threads can share one ``Client`` (their calls
are multiplexed on its one connection).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from ._async import AsyncClient, ProgressCallback, Source
from ._results import InvokeResult
from .protocol import CallStatus, Identity, InvocationRecord, StatsReply, UnavailableError

__all__ = ["Client"]

_T = TypeVar("_T")


class Client:
    """Blocking client for fnserver; ``with Client("host:port") as c: c.invoke(...)``.

    ``address`` may name several nodes, as a list or a comma-separated string, as for
    :class:`AsyncClient`. ``progress`` callbacks given to :meth:`register` run on the client's loop thread.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        token: str | None = None,
        *,
        connect_timeout: float = 10.0,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self._async = AsyncClient(address, token, connect_timeout=connect_timeout, ca_file=ca_file)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fnclient-loop", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._stopped = False

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        with self._lock:
            if self._stopped:
                coro.close()
                raise UnavailableError("client is closed")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError as exc:
            raise UnavailableError("client closed") from exc
        except BaseException:
            # KeyboardInterrupt in the calling thread: stop the call instead of orphaning it.
            future.cancel()
            raise

    @property
    def address(self) -> str:
        """The address of the node this client is connected to (or will try first)."""
        return self._async.address

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every node this client knows, in the order given."""
        return self._async.addresses

    @property
    def server_info(self) -> dict[str, Any]:
        """The server's HELLO result (PROTOCOL.md §4)."""
        return self._async.server_info

    def connect(self) -> None:
        """Open the connection and complete HELLO; a no-op when already connected."""
        self._run(self._async.connect())

    def close(self) -> None:
        """Close the connection and stop the loop thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            asyncio.run_coroutine_threadsafe(self._async.close(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def ping(self, *, deep: bool = False) -> None:
        """See :meth:`AsyncClient.ping`."""
        self._run(self._async.ping(deep=deep))

    def whoami(self) -> Identity:
        """See :meth:`AsyncClient.whoami`."""
        return self._run(self._async.whoami())

    def register(
        self,
        name: str,
        path_or_bytes: Source,
        *,
        filename: str | None = None,
        timeout_ms: int | None = None,
        memory_mb: int | None = None,
        alias: str | None = None,
        kind: str | None = None,
        description: str | None = None,
        progress: ProgressCallback | None = None,
        fuel: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """See :meth:`AsyncClient.register`."""
        return self._run(
            self._async.register(
                name,
                path_or_bytes,
                filename=filename,
                timeout_ms=timeout_ms,
                memory_mb=memory_mb,
                alias=alias,
                kind=kind,
                description=description,
                progress=progress,
                fuel=fuel,
                env=env,
            )
        )

    def invoke(
        self,
        name: str,
        input: bytes | bytearray | memoryview | str = b"",  # noqa: A002 - the wire field's name
        *,
        version: int | str | None = None,
        args: Sequence[str] = (),
        timeout_ms: int | None = None,
        mode: str | None = None,
    ) -> InvokeResult:
        """See :meth:`AsyncClient.invoke`."""
        return self._run(
            self._async.invoke(
                name, input, version=version, args=args, timeout_ms=timeout_ms, mode=mode
            )
        )

    def invoke_async(
        self,
        name: str,
        input: bytes | bytearray | memoryview | str = b"",  # noqa: A002 - the wire field's name
        *,
        version: int | str | None = None,
        args: Sequence[str] = (),
        timeout_ms: int | None = None,
        mode: str | None = None,
    ) -> str:
        """See :meth:`AsyncClient.invoke_async`."""
        return self._run(
            self._async.invoke_async(name, input, version=version, args=args, timeout_ms=timeout_ms, mode=mode)
        )

    def result(self, invocation_id: str, *, wait: bool | float = False) -> CallStatus:
        """See :meth:`AsyncClient.result`."""
        return self._run(self._async.result(invocation_id, wait=wait))

    def logs(self, name: str, *, version: int | None = None, limit: int = 20,
             after: int | None = None) -> list[InvocationRecord]:
        """See :meth:`AsyncClient.logs`."""
        return self._run(self._async.logs(name, version=version, limit=limit, after=after))

    def stats(self, name: str | None = None, *, tenant: str | None = None) -> StatsReply:
        """See :meth:`AsyncClient.stats`."""
        return self._run(self._async.stats(name, tenant=tenant))

    def list(self, *, all: bool = False) -> list[dict[str, Any]]:  # noqa: A002, A003 - the operation's names
        """See :meth:`AsyncClient.list`."""
        return self._run(self._async.list(all=all))

    def get(
        self,
        name: str,
        version: int | str | None = None,
        *,
        log: bool = False,
        limit: int | None = None,
        cursor: int | None = None,
    ) -> dict[str, Any]:
        """See :meth:`AsyncClient.get`."""
        return self._run(self._async.get(name, version, log=log, limit=limit, cursor=cursor))

    def compile(self, name: str, version: int | str | None = None) -> dict[str, Any]:
        """See :meth:`AsyncClient.compile`."""
        return self._run(self._async.compile(name, version))

    def delete(self, name: str, version: int | None = None) -> dict[str, Any]:
        """See :meth:`AsyncClient.delete`."""
        return self._run(self._async.delete(name, version))

    def alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """See :meth:`AsyncClient.alias`."""
        return self._run(self._async.alias(name, alias, version))
