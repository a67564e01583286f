"""`Offload.async_delays` (vLLM's vllm:kv_offload_lookup_async_delay_seconds, one value per deferred request)
stays bounded when nothing reads it (an offline replay), and keeps every value for its reader, the
connector metrics, which listen to the stores and take the values at each scrape. Virtual time only."""
from __future__ import annotations

from emulator.kv_tiers import UNREAD_DELAYS_KEPT, KVTier, Offload, TierSpec


def offload() -> Offload:
    return Offload([KVTier(TierSpec("cpu", 100 * 1e6, 1e9, 1e-3), 1e6)], stores_in_flight=True)


def defer_and_resolve(o: Offload, requests: int, first: int = 0) -> list[float]:
    """`requests` requests (from number `first` on, one a second), each deferred by a chunk it would load
    still being stored, then looked up once the copy ended: the delays each observes, in order."""
    delays = []
    for i in range(first, first + requests):
        request, at, prefix = object(), float(i), [2 * i + 1, 2 * i + 2]
        o.advance(at)
        o.admit(request)
        o.store(prefix)  # another request's store: its copy in flight
        assert o.lookup(prefix, 0, 2, request) is None  # HIT_PENDING: deferred at `at`
        o.step_ended(at)
        o.advance(at + 0.5 + i / 1e4)  # the copy (~1 ms) ended: the next lookup is not deferred
        assert o.lookup(prefix, 0, 2, request)
        delays.append(o.now - at)
        o.request_finished(request, [2 * i + 1, 2 * i + 2], 2, 2)
    return delays


def test_delays_nobody_reads_are_kept_only_up_to_a_bound():
    o = offload()
    delays = defer_and_resolve(o, 3 * UNREAD_DELAYS_KEPT)
    assert UNREAD_DELAYS_KEPT <= len(o.async_delays) <= 2 * UNREAD_DELAYS_KEPT
    assert o.async_delays == delays[-len(o.async_delays):]  # the newest, in order


def test_a_store_listener_reads_them_so_every_delay_is_kept_until_it_takes_them():
    o = offload()
    o.store_listeners.append(lambda chunks, blocks: None)  # (server.connector_metrics listens so)
    delays = defer_and_resolve(o, 3 * UNREAD_DELAYS_KEPT)
    assert o.async_delays == delays
    o.async_delays.clear()  # a scrape took them
    assert defer_and_resolve(o, 2, 3 * UNREAD_DELAYS_KEPT) == o.async_delays
