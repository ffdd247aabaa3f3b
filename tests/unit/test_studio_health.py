"""grpc.health.v1.Health as the Studio answers it (services/studio/health.py), from its
HealthState: SERVING only while sessions are admitted; unknown names NOT_FOUND / SERVICE_UNKNOWN.
The same methods behind Ray Serve's gRPC proxy: tests/integration/test_standard_grpc.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.common.errors import NotFound
from services.studio import health as studio_health
from services.studio.health import StudioHealth
from shared.telemetry import HealthState

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Studio(StudioHealth):
    def __init__(self) -> None:
        self.health = HealthState("studio")
        self.health.mark_ready()


class RayLikeContext:
    """What Ray Serve hands a replica: code/details/trailers are set, nothing raises."""

    def __init__(self) -> None:
        self.code = self.details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        self.trailing = md


def check(studio, service, ctx=None):
    return asyncio.run(studio.Check(health_pb2.HealthCheckRequest(service=service), grpc_context=ctx))


def test_serving_while_admitting_then_not_serving():
    studio = Studio()
    assert check(studio, "").status == SERVING
    assert check(studio, "fashionchameleon.v1.Studio").status == SERVING
    studio.health.mark_not_ready("redis lost")
    assert check(studio, "fashionchameleon.v1.Studio").status == NOT_SERVING
    studio.health.mark_ready()
    studio.health.start_draining()
    assert check(studio, "").status == NOT_SERVING
    listed = asyncio.run(studio.List(health_pb2.HealthListRequest()))
    assert {k: v.status for k, v in listed.statuses.items()} == {
        "": NOT_SERVING,
        "fashionchameleon.v1.Studio": NOT_SERVING,
    }


def test_unknown_service_is_not_found():
    ctx = RayLikeContext()
    assert check(Studio(), "fashionchameleon.v1.Generator", ctx) == health_pb2.HealthCheckResponse()
    assert ctx.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFound):
        check(Studio(), "nope")


def test_watch_sends_changes_and_ends_when_draining(monkeypatch):
    monkeypatch.setattr(studio_health, "WATCH_POLL_S", 0.01)
    studio = Studio()

    async def watch():
        seen = []
        async for response in studio.Watch(health_pb2.HealthCheckRequest(service="")):
            seen.append(response.status)
            if len(seen) == 1:
                studio.health.start_draining()
        return seen

    assert asyncio.run(asyncio.wait_for(watch(), 5)) == [SERVING, NOT_SERVING]


def test_watch_of_an_unknown_service_says_so():
    async def first():
        agen = Studio().Watch(health_pb2.HealthCheckRequest(service="nope"))
        try:
            return (await anext(agen)).status
        finally:
            await agen.aclose()

    assert asyncio.run(first()) == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
