"""Partition leases in NATS KV (adapters/fleet/leases.py), against a real nats-server: every
partition held exactly once, equal shares, hand-off when a worker joins or leaves, takeover
after a dead worker's TTL, and a paused holder that finds its lease gone."""

from __future__ import annotations

import asyncio

import nats

from adapters.fleet.leases import LeaseSettings, PartitionLeases

SETTINGS = LeaseSettings(partitions=16, ttl=2.0, bucket="test_leases")


async def _round(workers: list[PartitionLeases], rounds: int = 3) -> None:
    for _ in range(rounds):
        for w in workers:
            plan = await w.rebalance()
            for partition in plan.hand_off:  # a real worker settles first, then releases
                await w.release(partition)


def _check_exclusive(workers: list[PartitionLeases]) -> None:
    held = [p for w in workers for p in w.held]
    assert len(held) == len(set(held)), "a partition held twice"
    assert set(held) == set(range(SETTINGS.partitions))


def test_leases_split_evenly_move_on_join_and_leave_and_expire(server):
    async def main() -> None:
        conns = [await nats.connect(server.url) for _ in range(4)]
        a, b, c = (PartitionLeases(nc.jetstream(), name, SETTINGS)
                   for nc, name in zip(conns, ("a", "b", "c"), strict=False))
        for w in (a, b):
            await w.start()
        await _round([a, b])
        _check_exclusive([a, b])
        assert len(a.held) == len(b.held) == 8

        await c.start()  # a worker joins
        await _round([a, b, c])
        _check_exclusive([a, b, c])
        assert sorted(len(w.held) for w in (a, b, c)) == [5, 5, 6]

        await c.stop()  # one leaves gracefully: its partitions are free at once
        await _round([a, b])
        _check_exclusive([a, b])
        assert len(a.held) == len(b.held) == 8

        # b stops renewing (dead, or paused: SIGSTOP); its keys stay until the TTL, then a
        # takes its partitions
        b_had = set(b.held)
        await asyncio.sleep(SETTINGS.ttl + 1.5)
        await _round([a])
        assert set(a.held) == set(range(SETTINGS.partitions))

        # b resumes: every renewal fails (a holds them now), and it takes nothing held
        plan = await b.rebalance()
        assert plan.lost == b_had and not b.held
        await _round([a, b])  # then a hands its share back
        _check_exclusive([a, b])
        assert len(a.held) == len(b.held) == 8
        for nc in conns:
            await nc.close()

    asyncio.run(main())


def test_release_during_a_renewal_frees_the_partition(server):
    """A worker hands a partition off while its lease loop renews (they run side by side):
    the release must still free the key, and the renewal must not bring the partition back
    (seen in `bench fleet`: 'wrong last sequence' on the release, KeyError in the next round,
    and the other worker waiting out the TTL for a partition nobody consumed)."""
    settings = LeaseSettings(partitions=2, ttl=30.0, bucket="test_leases_race")

    async def main() -> None:
        nc = await nats.connect(server.url)
        kv_nc = await nats.connect(server.url)
        leases = PartitionLeases(nc.jetstream(), "a", settings)
        other = PartitionLeases(kv_nc.jetstream(), "b", settings)
        await leases.start()
        kv = await kv_nc.jetstream().key_value(settings.bucket)
        for round_ in range(40):
            await other.stop()  # alone, a takes both partitions
            await leases.rebalance()
            assert set(leases.held) == {0, 1}
            await other.start()  # b is live: partition 1 is b's now, a hands it off
            renewal = asyncio.create_task(leases.rebalance())
            # the release comes at a different point of the renewal's round trips each time
            await asyncio.sleep(round_ * 0.0001)
            await leases.release(1)
            await renewal  # raises if the round tripped over the release
            assert 1 not in leases.held, f"round {round_}: the renewal took 1 back"
            assert "p.1" not in await _keys(kv), f"round {round_}: the release left the key"
        await nc.close()
        await kv_nc.close()

    async def _keys(kv) -> list[str]:
        try:
            return await kv.keys()
        except Exception:  # no keys at all
            return []

    asyncio.run(main())
