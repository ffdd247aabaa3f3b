"""`grpc.health.v1.Health` on the public gRPC port, answered by the Studio ingress deployment.

Ray Serve's gRPC proxy routes a method to the ingress deployment's method of the same name,
so registering the standard servicer function (`services.app.HEALTH_SERVICER`) among the
proxy's servicer functions sends `/grpc.health.v1.Health/Check` (and `Watch`, `List`) to
`StudioHealth`'s methods here, mixed into `StudioService`. Kubernetes gRPC probes, grpc_health_probe and load
balancers speak this protocol (https://github.com/grpc/grpc/blob/master/doc/health-checking.md).

The status follows the Studio replica's `HealthState` (`/readyz` on the HTTP side): SERVING
while it admits new sessions, NOT_SERVING when it is not ready, unhealthy or draining. The
overall server ("") and `fashionchameleon.v1.Studio` are known; `Check` on any other name is
NOT_FOUND and `Watch` answers SERVICE_UNKNOWN, as the protocol says.

The proxy picks the Serve application from the `application` metadata, or takes the only one
deployed: metadata-less callers (kubelet's `grpc:` probe) need the suite to be the only
application on the cluster, as in the Helm chart; with the Eval application beside it, send
`application: <serve.app_name>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from grpc_health.v1 import health_pb2

from services.common.errors import NotFound, abort_context

STUDIO_SERVICE_NAME = "fashionchameleon.v1.Studio"
SERVICE_NAMES = ("", STUDIO_SERVICE_NAME)  # "": the server as a whole
WATCH_POLL_S = 1.0  # how often Watch looks at the health state for a change

_Status = health_pb2.HealthCheckResponse.ServingStatus


class StudioHealth:
    """The Health service's methods; the class mixing it in provides `self.health`
    (a `shared.telemetry.HealthState`)."""

    health: Any

    def _serving_status(self, service: str, snapshot: Any = None) -> int:
        if service not in SERVICE_NAMES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        accepting = (snapshot or self.health.snapshot()).accepting
        return health_pb2.HealthCheckResponse.SERVING if accepting else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request, grpc_context=None) -> health_pb2.HealthCheckResponse:
        status = self._serving_status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            err = NotFound(f"unknown service {request.service!r}", metadata={"service": request.service})
            if grpc_context is None:
                raise err
            abort_context(grpc_context, err)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request, grpc_context=None) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=self._serving_status(name)) for name in SERVICE_NAMES}
        )

    async def Watch(self, request, grpc_context=None) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status at once, then each change. A draining replica sends NOT_SERVING
        and ends the stream (it will not serve again; a reconnect reaches another replica)."""
        last = None
        while True:
            snapshot = self.health.snapshot()  # one reading: the status sent and the end agree
            status = self._serving_status(request.service, snapshot)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if snapshot.draining:
                return
            await asyncio.sleep(WATCH_POLL_S)
