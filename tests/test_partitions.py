"""events.partitions computes the partition NATS's subject transform computes."""

from __future__ import annotations

import asyncio

import nats
from nats.js.api import StreamConfig, SubjectTransform

from events.partitions import partition_of

USERS = ["alice", "bob", "u-1", "user_42", "ÅSA", "x" * 120,
         *(f"user{n}" for n in range(300))]


def test_partition_of_matches_the_servers_subject_transform(server):
    async def main() -> dict[str, int]:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(
            name="parts", subjects=["in.*"],
            subject_transform=SubjectTransform(src="in.*",
                                               dest="p.{{partition(16,1)}}.{{wildcard(1)}}")))
        for user in USERS:
            await js.publish(f"in.{user}", b"")
        sub = await js.pull_subscribe("p.>", "check", stream="parts")
        seen: dict[str, int] = {}
        while len(seen) < len(set(USERS)):
            for msg in await sub.fetch(100, timeout=5):
                _p, part, user = msg.subject.split(".", 2)
                seen[user] = int(part)
                await msg.ack()
        await nc.close()
        return seen

    seen = asyncio.run(main())
    assert seen == {user: partition_of(user, 16) for user in USERS}
    assert len(set(seen.values())) == 16  # and it spreads them
