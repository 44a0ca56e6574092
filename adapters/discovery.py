"""Registration as a NATS service (nats-py's `nats.micro`), so that the standard tooling finds
microtune: `nats micro ls`, `nats micro info microtune`, or a request on `$SRV.PING`,
`$SRV.INFO.microtune`, `$SRV.STATS.microtune`.

Every process registers an instance of the service `microtune` with the endpoints it answers:
the service process `info` and `admin` (`<prefix>.admin.*`), each query process `query`
(`<prefix>.query.*`, in the query processes' queue group). The endpoints' handlers are the
processes' own message handlers, unchanged (they receive the NATS message itself), and
`nats.micro` counts requests, errors and processing time for `$SRV.STATS`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

NAME = "microtune"
VERSION = "0.1.0"  # pyproject.toml's
DESCRIPTION = "real-time personalization: events in, content weights out"


async def register(nc: Client, role: str,
                   endpoints: Sequence[tuple[str, str, Callable[[Msg], Awaitable[None]]]],
                   queue_group: str | None = None) -> Service:
    """Register this process's instance: `endpoints` as (name, subject, handler of a Msg)."""
    service = await add_service(nc, ServiceConfig(
        name=NAME, version=VERSION, description=DESCRIPTION, metadata={"role": role},
        queue_group=queue_group))
    for name, subject, handler in endpoints:
        await service.add_endpoint(EndpointConfig(name=name, subject=subject,
                                                  handler=_handing(handler)))
    return service


def _handing(handler: Callable[[Msg], Awaitable[None]]) -> Callable[[Request], Awaitable]:
    async def handle(request: Request) -> None:
        # nats.micro wraps the message; microtune's handlers answer the message itself
        await handler(request._msg)

    return handle
