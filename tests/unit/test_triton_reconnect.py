"""TritonBackend reopens its Triton connections every reconnect_s, so replicas behind one name share the load."""

from __future__ import annotations

import asyncio

from vlmserve.gateway.backends.triton import TritonBackend


def test_clients_are_replaced_after_reconnect_s_and_the_old_ones_closed() -> None:
    clock = [1000.0]

    async def scenario() -> None:
        backend = TritonBackend("127.0.0.1:1", timeout_s=0.01, grpc_url="127.0.0.1:2", reconnect_s=30)
        backend.clock = lambda: clock[0]
        http, grpc = backend.client, backend.grpc_client
        clock[0] += 29
        assert backend.client is http and backend.grpc_client is grpc  # within the period: the same pools
        clock[0] += 2
        new_http, new_grpc = backend.client, backend.grpc_client
        assert new_http is not http and new_grpc is not grpc  # re-resolved, new connections
        closed = []
        http.close, grpc.close = (lambda: _note(closed, "http")), (lambda: _note(closed, "grpc"))
        await asyncio.sleep(0.05)  # the old ones close once their requests can have finished (timeout_s)
        assert sorted(closed) == ["grpc", "http"]
        await backend.close()

    asyncio.run(scenario())


async def _note(closed: list[str], name: str) -> None:
    closed.append(name)


def test_reconnect_zero_keeps_the_connections() -> None:
    clock = [1000.0]

    async def scenario() -> None:
        backend = TritonBackend("127.0.0.1:1", grpc_url="127.0.0.1:2")
        backend.clock = lambda: clock[0]
        http = backend.client
        clock[0] += 10_000
        assert backend.client is http
        await backend.close()

    asyncio.run(scenario())
