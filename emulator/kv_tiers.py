"""KV memory tiers below the GPU: vLLM's native CPU offloading, a CXL tier, an LMCache-like pool.

A tier keeps copies of KV blocks by their hash (the same chained hash as the GPU prefix cache,
so equal prompt prefixes find each other), least recently used first out, within its capacity.
As vLLM's OffloadingConnector does (kv_connector/v1/offloading/scheduler.py), a request's blocks are
stored as soon as they are full (the copy runs device-to-host beside the compute, on the other
direction of the link than loads, so it costs no step time, but its chunks are neither readable nor
evictable until it ends: `Offload.stores_in_flight`, `StoreJob`): in chunks of `blocks_per_chunk` GPU
blocks (its kv_connector_extra_config block_size or blocks_per_chunk), a chunk once all of it is full,
and with offload_prompt_only (its default) only the chunks the prompt fills, never decode blocks. At
admission, the chunks that follow a request's GPU prefix hit and sit in a tier are loaded back
(host-to-device over the tier's link, emulator.kv_transfer) before the request runs, leaving at least
one token to compute. An LRU tier keeps blocks, not chunks: two chunks that begin with the same blocks
share those there (vLLM keys a chunk by the hash of its last block, so it stores both whole, as the ARC
tier does).

An `Offload` is an engine's chain of tiers: a block pushed out of one goes to the next (CPU, then
CXL). The same `Offload` object may serve several engines: an LMCache-like pool shared by the
instances of a node, where instance B hits on a prefix instance A computed. Each tier counts the
blocks it stored, loaded and evicted; an `Offload` tells its store listeners how many blocks each
store copied to the nearest tier (vLLM's store job; emulator.kv_stats, server.connector_metrics),
and its `on_change` hook (a KV-event recorder: emulator.kv_events) which blocks each store added to
and pushed out of each tier.

OffloadingConnector's kv_connector_extra_config picks how its CPU tier evicts (`eviction_policy`): "lru"
(vLLM's default: `KVTier`) or "arc" (`ARCTier`, vLLM's adaptive replacement cache); and with
`store_threshold` >= 2 a chunk is stored only once it has been offered that many times (each store call
offers its chunks; vLLM's `CPUOffloadingManager` counts offers in a table of at most `max_tracker_size`
chunks, least recently offered forgotten first), which `Offload.store` applies before its nearest tier.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress, filterfalse, islice
from operator import eq

BACKENDS = ("native", "lmcache")


def pin(pins: dict, keys: list[int]) -> bool:
    """One more reader (a load) or writer (a store in flight) of each of `keys`: not evicted meanwhile. True
    when `keys` were found distinct (their `unpin` may say so)."""
    if pins.keys().isdisjoint(keys):
        fresh = dict.fromkeys(keys, 1)
        if len(fresh) == len(keys):  # (distinct and none pinned, as a store's new chunks are: each pinned once)
            pins.update(fresh)
            return True
    for key in keys:
        pins[key] = pins.get(key, 0) + 1
    return False


def unpin(pins: dict, keys: list[int], distinct: bool = False) -> None:
    """One reader or writer less of each of `keys` (`distinct`: the caller knows they are)."""
    if len(keys) > 1 and (distinct or len(set(keys)) == len(keys)):  # (as a job's or a load's are: popped in C)
        counts = list(map(pins.pop, keys))
        if max(counts) > 1:  # (pinned by another job or load too: it stays, once less)
            pins.update((key, count - 1) for key, count in zip(keys, counts) if count > 1)
        return
    for key in keys:
        if pins[key] == 1:
            del pins[key]
        else:
            pins[key] -= 1


def delete(table: dict, keys: list) -> None:
    """`del table[key]` for each of `keys` (the loop in C)."""
    deque(map(table.__delitem__, keys), maxlen=0)


@dataclass(frozen=True)
class TierSpec:
    name: str              # cpu | cxl | lmcache
    capacity_bytes: float
    bandwidth: float       # bytes/s per GPU between the tier and a GPU
    latency: float         # seconds per load
    medium: str = "CPU"    # vLLM's KV-event medium


UNREAD_DELAYS_KEPT = 1024  # the async delays an `Offload` keeps when no metrics reader listens (async_delays)
IN_RUN = 1 << 62  # a block's sequence number in KVTier's index while a running request's run ranks it


@dataclass(eq=False)
class RequestRun:
    """A running request's rank in an LRU tier (vLLM's LRUCachePolicy: the rank a request gets when it first
    touches the cache), with the blocks it ranks: those it stored, and those it loaded or offered that were
    older than the rank, each by its position in the request, the tail evicted first. The run sits in the
    tier's log at `anchor`, where it got its rank: older than what was ranked after, newer than before.

    While it is `exclusive`, every block it saw that the tier holds is one of its members (none was ranked
    by another request, left out as newer than its rank, evicted, or offered in a store that failed: each of
    those clears it), so that its end ranks its members anew as they are, without looking at what it saw."""
    order: int            # runs by rank
    anchor: int           # the sequence number of its marker in the log (-1: eviction has passed it)
    members: dict = field(default_factory=dict)  # block hash -> position in the request
    ordered: bool = True  # members are by position (else sorted when the tier evicts from them)
    seen: set = field(default_factory=set)       # the blocks it has loaded or offered (vLLM's seen_keys)
    live: bool = True     # not finished
    exclusive: bool = True  # the blocks it saw that the tier holds are its members (see above)

    def tail(self) -> Iterator[int]:
        """Its blocks in eviction order, the tail first (an iterator: the members must not change meanwhile)."""
        if not self.ordered:
            self.members = dict(sorted(self.members.items(), key=lambda item: item[1]))
            self.ordered = True
        return reversed(self.members)

    def tail_first(self) -> list[int]:
        """Its blocks in eviction order: the tail first."""
        return list(self.tail())

    def take_tail(self, n: int) -> list[int]:
        """Up to n of its blocks, tail first, taken out of its members (an eviction: it is no longer exclusive)."""
        self.tail()  # (ordered by position: the last member is the tail)
        members = self.members
        self.exclusive = False
        return [members.popitem()[0] for _ in range(min(n, len(members)))]

    def lose(self, block_hash: int) -> None:
        """One of its blocks is ranked elsewhere or evicted: it is no longer exclusive."""
        del self.members[block_hash]
        self.exclusive = False

    def add(self, block_hash: int, position: int) -> None:
        members = self.members
        if members and self.ordered and position < members[next(reversed(members))]:
            self.ordered = False
        members[block_hash] = position


@dataclass(eq=False)
class KVTier:
    """A tier's blocks by hash, least recently used first out, in the order vLLM's CPU LRU ranks a
    request's chunks: a run it stores or loads goes in tail first (its head is evicted last), and when it
    finishes what it offered becomes the most recently used, head most (`refresh`).

    The LRU order is an append-only log of hashes (`_log`, whose first entry has sequence number
    `_base`) and an index hash -> the sequence number of its newest entry: an entry is live while
    the index points at it and it is not behind `_head`, where eviction has reached. Refreshing a
    block appends a new entry and leaves a hole (the old one); evicting from the front walks
    `_head` on, past the holes. Stores of new blocks, the common case, are then slices and one dict
    update, and a store that overfills the tier pushes out a slice of the log when it has no hole (and
    its index entries). Once the log is over twice what the tier holds, the entries behind `_head` are
    dropped (the sequence numbers stay), and if it still is, it is rebuilt of the live entries alone.

    An `all_or_nothing` tier (the CPU tier of vLLM's OffloadingConnector: its manager's prepare_store) stores
    nothing of a run it cannot make room for without pushing out a block being loaded or one of the run's
    own, and says so (`put_many` returns None); otherwise (a CXL tier, an LMCache-like pool) it pushes out
    what it must, the run's own tail last.

    A `by_request` tier (that CPU tier again) ranks as vLLM's LRU policy does while requests run: a request
    gets a rank when it first stores or loads (a `RequestRun`, whose marker goes at the log's end), and
    each block it stores, and each it loads or offers that is older than the rank, is ranked (that rank,
    its position), tail before head: all older than anything ranked after the request started, whatever
    step stored them. Its end (`refresh`) ranks what it saw anew at the log's end, head most recent. A run's
    blocks are in its `members`, their index entries `IN_RUN`; eviction reaching the marker takes them
    first (a run whose marker it passed while the request still runs is in `_passed`, evicted first)."""
    spec: TierSpec
    block_bytes: float     # one block across the instance's ranks
    blocks_per_chunk: int = 1  # its capacity is whole chunks of that many blocks
    all_or_nothing: bool = False
    by_request: bool = False  # ranks a running request's blocks by its rank (see above)
    stored: int = 0        # blocks written
    loaded: int = 0        # blocks read back
    evicted: int = 0
    capacity_blocks: int = 0
    pins: dict = field(default_factory=dict, repr=False)  # hash -> loads reading it (never evicted meanwhile)
    # hash -> store jobs copying it, pinned too: the chain's `Offload.storing` where a chunk is one block (a store
    # job then pins its blocks in one table, not two); else {}
    stores: dict = field(default_factory=dict, repr=False)
    _index: dict = field(default_factory=dict, repr=False)  # hash -> sequence number of its newest entry
    _log: list = field(default_factory=list, repr=False)    # hashes by sequence number, from _base
    _base: int = 0
    _head: int = 0         # entries before it are gone
    _holes: int = 0        # dead entries from _head on
    _markers: int = 0      # runs' markers from _head on (holes too: while they are all the holes, every block
                           # entry from the head on is live, up to the next marker, which a walk need not look up)
    _marks: deque = field(default_factory=deque, repr=False)  # the runs whose markers those are, in order
    _held: int = 0
    _runs: int = 0         # runs not finished
    _runs_made: int = 0
    _run_of: dict = field(default_factory=dict, repr=False)  # block hash -> the run ranking it
    _passed: list = field(default_factory=list, repr=False)  # live runs whose marker eviction passed, by rank

    def __post_init__(self) -> None:
        chunks = int(self.spec.capacity_bytes // (self.block_bytes * self.blocks_per_chunk))
        self.capacity_blocks = chunks * self.blocks_per_chunk

    @property
    def num_held(self) -> int:
        return self._held

    @property
    def usage(self) -> float:
        return self._held / self.capacity_blocks if self.capacity_blocks else 0.0

    @property
    def blocks(self) -> dict[int, None]:
        """The blocks held, least recently used first (a copy: for tests and inspection)."""
        return dict.fromkeys(self._ordered())

    def holds(self, block_hash: int) -> bool:
        seq = self._index.get(block_hash)
        return seq is not None and seq >= self._head

    holds_chunk = holds  # (a chunk, by its last block: held while that block is)

    def holds_none(self, keys: list[int]) -> bool:
        """None of `keys` is held (the index has no entry eviction has passed)."""
        return self._index.keys().isdisjoint(keys)

    def _ordered(self) -> Iterator[int]:
        """The blocks held, in eviction order: the runs' blocks at their markers."""
        for run in self._passed:
            yield from run.tail()
        index, base, log = self._index, self._base, self._log
        for seq in range(self._head, base + len(log)):
            h = log[seq - base]
            if index.get(h) == seq:
                yield h
            elif h.__class__ is RequestRun and h.live:
                yield from h.tail()

    def _append(self, hashes: list[int]) -> None:
        """New entries at the back (for hashes not held, or refreshed: the caller counts them)."""
        if self._run_of:  # a run's block has no entry of its own in the log to leave as a hole
            run_of = self._run_of
            for h in hashes:
                run = run_of.pop(h, None)
                if run is not None:
                    run.lose(h)
                    self._holes -= 1
        self._push(hashes)

    def _push(self, hashes: list[int]) -> None:
        """`_append` of hashes none of which a run ranks."""
        tail = self._base + len(self._log)
        self._index.update(zip(hashes, range(tail, tail + len(hashes))))
        log = self._log
        log += hashes
        if len(log) > 2 * self._held + 1024:
            # the entries eviction passed go (their index entries went with them): sequence numbers stay
            del log[:self._head - self._base]
            self._base = self._head
            if len(log) <= 2 * self._held + 1024:
                return
            # mostly holes: keep only the live entries
            if self._runs:
                self._rebuild_with_runs()
                return
            stretch = log
            live = stretch if not self._holes else list(compress(stretch, map(
                eq, map(self._index.get, stretch), range(self._head, self._head + len(stretch)))))
            self._index, self._log = dict(zip(live, range(len(live)))), live
            self._base = self._head = self._holes = self._markers = 0
            self._marks.clear()

    def _rebuild_with_runs(self) -> None:
        """`_append`'s rebuild of the log while requests run: the live entries and the live runs' markers."""
        index, base, log = self._index, self._base, self._log
        entries = []
        for seq in range(self._head, base + len(log)):
            h = log[seq - base]
            if index.get(h) == seq:
                entries.append(h)
            elif h.__class__ is RequestRun and h.live:
                h.anchor = len(entries)
                entries.append(h)
        index = {h: i for i, h in enumerate(entries) if h.__class__ is not RequestRun}
        self._marks = deque(h for h in entries if h.__class__ is RequestRun)  # (the live runs')
        self._holes = self._markers = len(self._marks)
        index.update(dict.fromkeys(self._run_of, IN_RUN))
        self._index, self._log = index, entries
        self._base = self._head = 0  # (the passed runs have no marker in the log: their anchor stays -1)

    def _drop(self, h: int) -> None:
        """Take a held block out of the order (the caller counts it)."""
        run = self._run_of.pop(h, None) if self._run_of else None
        if run is not None:
            run.lose(h)
        else:
            self._holes += 1
        del self._index[h]

    # -- a running request's rank (vLLM's LRUCachePolicy.on_request_access and insert) ---------------------
    def _run(self, request: RequestOffload) -> RequestRun:
        """The request's run, made (its rank taken, its marker at the log's end) on its first use."""
        run = request.rank
        if run is None:
            self._runs_made += 1
            self._runs += 1
            run = request.rank = RequestRun(self._runs_made, self._base + len(self._log))
            self._log.append(run)
            self._holes += 1
            self._markers += 1
            self._marks.append(run)
        return run

    def _rank(self, run: RequestRun, h: int, position: int) -> None:
        """A held block the request sees for the first time: ranked by it, if older than its rank."""
        seq = self._index[h]
        if seq == IN_RUN:
            other = self._run_of[h]
            if other.order >= run.order:
                run.exclusive = False
                return
            other.lose(h)
        else:
            if seq >= run.anchor:
                run.exclusive = False
                return
            self._holes += 1
        self._index[h] = IN_RUN
        self._run_of[h] = run
        run.add(h, position)

    def access(self, request: RequestOffload, block_hashes: list[int], i: int, n: int) -> None:
        """The request loads blocks i..i+n (vLLM's prepare_load records them): those held here it has not seen
        are ranked by it if older (those loaded from a tier below are not this tier's to record)."""
        run = self._run(request)
        seen, index, head = run.seen, self._index, self._head
        for j in range(i, i + n):
            h = block_hashes[j]
            if h not in seen and index.get(h, -1) >= head:
                seen.add(h)
                self._rank(run, h, j)

    def touch(self, block_hash: int) -> None:
        """A held block is the most recently used now."""
        self._renew([block_hash])

    def _renew(self, hashes: list[int]) -> None:
        """Held blocks go to the back, in this order (their old entries are holes now)."""
        self._holes += len(hashes)  # (before: a rebuild in _append leaves none)
        self._append(hashes)

    def put(self, block_hash: int) -> int | None:
        """Keep a copy; returns the hash pushed out to make room (None if none)."""
        if self.holds(block_hash):
            self.touch(block_hash)
            return None
        if self.capacity_blocks <= 0:
            return block_hash
        self._append([block_hash])
        self._held += 1
        self.stored += 1
        if self._held > self.capacity_blocks:
            self.evicted += 1
            return self._evict()
        return None

    def _evict(self) -> int:
        """Drop the least recently used block no load is reading (the one just added, if all others are;
        never a `by_request` tier's)."""
        pins, stores = self.pins, self.stores
        if not pins and not stores:
            return self._pop_oldest(1)[0]
        victim = next(h for h in self._ordered() if h not in pins and h not in stores)
        if self._index[victim] == self._head:
            return self._pop_oldest(1)[0]
        del self._index[victim]  # out of the middle: its entry is a hole now
        self._holes += 1
        self._held -= 1
        return victim

    def _skip_dead_head(self) -> None:
        """Walk `_head` past the dead entries at the front (victims taken from there around pinned blocks),
        so that the next walk from the head does not pass them again."""
        log, base, head, index = self._log, self._base, self._head, self._index
        end = base + len(log)
        while head < end:
            h = log[head - base]
            if index.get(h) == head:
                break
            if h.__class__ is RequestRun:
                self._markers -= 1
                self._marks.popleft()
                if h.live:
                    h.anchor = -1
                    self._passed.append(h)
            head += 1
            self._holes -= 1
        self._head = head

    def _pop_oldest(self, n: int) -> list[int]:
        """Take the n least recently used blocks out (there are n)."""
        self._held -= n
        if self._runs:
            return self._take_oldest(n)
        log, base, head = self._log, self._base, self._head
        if not self._holes:  # every entry from the head on is live
            gone = log[head - base:head - base + n]
            head += n
        else:
            gone = []
            while len(gone) < n:
                live = self._live_from(head, n - len(gone))
                gone += log[head - base:head - base + live]
                head += live
                if len(gone) < n:  # a dead entry
                    self._holes -= 1
                    if log[head - base].__class__ is RequestRun:
                        self._markers -= 1
                        self._marks.popleft()
                    head += 1
        self._head = head
        delete(self._index, gone)  # (so that the log can drop their entries without a look at the index)
        return gone

    def _live_from(self, seq: int, limit: int) -> int:
        """How many entries in a row from sequence number `seq` (the head, or past it) on (at most `limit`) are
        live blocks."""
        i, log, index = seq - self._base, self._log, self._index
        if self._holes == self._markers:  # (every dead entry from the head on is a marker: the blocks before the next)
            marks = self._marks
            return min(limit, (marks[0].anchor if marks else self._base + len(log)) - seq)
        if index.get(log[i]) != seq:  # (a dead entry: the common case of a walk past holes)
            return 0
        stretch = log[i:i + limit]
        live = list(map(eq, map(index.get, stretch), range(seq, seq + len(stretch))))
        return live.index(False) if False in live else len(live)

    def _take_oldest(self, n: int) -> list[int]:
        """`_pop_oldest` while requests run: from the passed runs first, then from the head, a live run's
        blocks where its marker is (there are n; the caller counts them)."""
        gone: list[int] = []
        for run in self._passed:  # (an emptied one stays: the request may store more)
            if len(gone) == n:
                return gone
            gone += self._take_from(run, n - len(gone))
        index = self._index
        log, base, head = self._log, self._base, self._head
        while len(gone) < n:
            live = self._live_from(head, n - len(gone))
            if live:
                taken = log[head - base:head - base + live]
                delete(index, taken)
                gone += taken
                head += live
                continue
            h = log[head - base]
            if h.__class__ is RequestRun and h.live:
                gone += self._take_from(h, n - len(gone))
                if len(gone) == n:
                    break  # (its marker stays: it may hold more)
                h.anchor = -1
                self._passed.append(h)
            if h.__class__ is RequestRun:
                self._markers -= 1
                self._marks.popleft()
            self._holes -= 1
            head += 1
        self._head = head
        return gone

    def _idle_oldest(self, n: int, offered: set[int] | dict[int, None]) -> list[int] | None:
        """The n blocks first in eviction order neither pinned nor `offered` (None: fewer are)."""
        idle = filterfalse(offered.__contains__, self._ordered())
        idle = filterfalse(self.pins.__contains__, filterfalse(self.stores.__contains__, idle))
        found = list(islice(idle, n))
        return found if len(found) == n else None

    def _take_from(self, run: RequestRun, n: int) -> list[int]:
        """Up to n of a run's blocks, tail first, taken out."""
        tail = run.take_tail(n)
        index, run_of = self._index, self._run_of
        delete(index, tail)
        delete(run_of, tail)
        return tail

    def put_many(self, block_hashes: list[int], misses: set[int] | None = None,
                 request: RequestOffload | None = None, positions: Sequence[int] | None = None,
                 none_held: bool = False) -> list[int] | None:
        """`put` each block of a request's run (`misses`: ARC's, unused here), tail first: its head is the
        most recently used (vLLM's LRU ranks a request's chunks by position, tails evicted before heads);
        the blocks pushed out, in order (None: an all-or-nothing tier had no room, and stored nothing).
        A `by_request` tier given the `request` storing (and the blocks' `positions` in it) ranks them by
        the request's rank instead (`_put_ranked`). `none_held`: the caller found none of them held."""
        if request is not None and self.by_request:
            return self._put_ranked(block_hashes, request, positions, none_held)
        if (self.capacity_blocks > 0 and not self.pins and not self.stores
                and self._index.keys().isdisjoint(block_hashes) and len(set(block_hashes)) == len(block_hashes)):
            # all new and distinct (as stores are): add, then drop the oldest
            if self.all_or_nothing and len(block_hashes) > self.capacity_blocks:
                return None
            self._append(block_hashes[::-1])
            self._held += len(block_hashes)
            self.stored += len(block_hashes)
            over = self._held - self.capacity_blocks
            if over <= 0:
                return []
            self.evicted += over
            return self._pop_oldest(over)
        if self.all_or_nothing:
            return self._put_all_or_nothing(block_hashes)
        pushed = (self.put(h) for h in reversed(block_hashes))
        return [h for h in pushed if h is not None]

    def _put_all_or_nothing(self, block_hashes: list[int]) -> list[int] | None:
        """`put_many` of an all-or-nothing tier: room is made first, from the least recently used blocks
        neither loaded nor in the run (vLLM's evict with the offer protected), or nothing is stored."""
        run = dict.fromkeys(block_hashes)
        index, head = self._index, self._head
        num_new = sum(1 for h in run if index.get(h, -1) < head)
        over = self._held + num_new - self.capacity_blocks
        victims = []
        if over > 0:
            if self.capacity_blocks <= 0:
                return None
            victims = self._idle_oldest(over, run)
            if victims is None:
                return None
            for h in victims:
                self._drop(h)
                self._held -= 1
            self.evicted += over
            self._skip_dead_head()
        # every block at once, tail first (as `put` one by one would leave them): the held ones refreshed
        self._holes += len(run) - num_new  # (before: a rebuild in _append leaves none)
        self._held += num_new
        self.stored += num_new
        self._append(list(reversed(run)))
        return victims

    def _put_ranked(self, block_hashes: list[int], request: RequestOffload,
                    positions: Sequence[int], none_held: bool = False) -> list[int] | None:
        """`put_many` of a `by_request` tier (all or nothing), as vLLM's prepare_store drives its LRU policy:
        the held blocks the request had not seen are ranked by it if older (even when the store then
        fails), room is made from the blocks in eviction order neither loaded nor offered, and the new
        blocks are ranked by the request."""
        if not block_hashes:
            return []
        run = self._run(request)
        seen, index, head = run.seen, self._index, self._head
        if none_held or index.keys().isdisjoint(block_hashes):  # none held (as stores of new blocks are)
            new = dict(zip(block_hashes, positions))
            seen.update(new)
        else:
            new = {}
            for h, j in zip(block_hashes, positions):
                if index.get(h, -1) >= head:
                    if h not in seen:
                        self._rank(run, h, j)
                elif h not in new:
                    new[h] = j
                seen.add(h)
        over = self._held + len(new) - self.capacity_blocks
        victims = []
        if over > 0:
            oldest_go = not self.pins and not self.stores and len(new) == len(block_hashes)  # (none pinned nor held)
            if self.capacity_blocks <= 0 or (oldest_go and over > self._held):
                run.exclusive = False  # (it saw blocks the tier does not hold)
                return None
            if oldest_go:
                victims = self._take_oldest(over)
            else:
                victims = self._idle_oldest(over, set(block_hashes))
                if victims is None:
                    run.exclusive = False
                    return None
                run_of, in_log = self._run_of, 0
                for h in victims:
                    owner = run_of.pop(h, None)
                    if owner is None:
                        in_log += 1
                    else:
                        owner.lose(h)
                    del index[h]
                self._holes += in_log
                self._skip_dead_head()
            self._held -= over
            self.evicted += over
        if not new:
            return victims
        members = run.members
        if run.ordered and not members:
            run.members = new  # (its first blocks: the dict as it is, no copy)
        elif run.ordered and members[next(reversed(members))] < min(new.values()):
            members.update(new)  # (after the run's blocks so far, as a request's later chunks are)
        else:
            for h, j in new.items():
                run.add(h, j)
        index.update(dict.fromkeys(new, IN_RUN))
        self._run_of.update(dict.fromkeys(new, run))
        self._held += len(new)
        self.stored += len(new)
        return victims

    def take(self, block_hashes: list[int], i: int, n: int) -> None:
        """Blocks i..i+n of a request are being loaded from here: pinned, and the most recently used now (the
        head most; in a `by_request` tier, `access` ranked them when the request was admitted)."""
        if not self.by_request:
            for h in reversed(block_hashes[i:i + n]):
                self.touch(h)
        pin(self.pins, block_hashes[i:i + n])
        self.loaded += n

    def refresh(self, block_hashes: list[int], request: RequestOffload | None = None) -> None:
        """A request that used these blocks (a head-to-tail run) finished: those held are the most recently
        used now, the head most (vLLM's LRU commits a finished request's recency so: in a `by_request` tier,
        of those it saw, and its run ends)."""
        if request is not None:  # (a request that never stored or loaded here saw nothing)
            if request.rank is not None:
                self._end_run(request.rank, block_hashes)
            return
        if not block_hashes:
            return
        log = self._log
        if log and log[-1] == block_hashes[0] and log[-len(block_hashes):] == block_hashes[::-1]:
            return  # the log ends with the run as stored: those held are already the newest, the head most
        index, head = self._index, self._head
        if index.keys().isdisjoint(block_hashes):
            return  # none held (the common case of a tier below another)
        live = [h for h in reversed(block_hashes) if index.get(h, -1) >= head]
        if live and self._log[-len(live):] != live:  # (already the newest, in this order: the common case)
            self._renew(live)

    def _end_run(self, run: RequestRun, block_hashes: list[int]) -> None:
        run.live = False
        self._runs -= 1
        if run.anchor < 0:
            self._passed.remove(run)
        if run.exclusive:  # what it saw and the tier holds are its members: they go to the back as they are
            live = run.tail_first()
            run.members = {}
            if len(self._run_of) == len(live):  # (they are all the runs rank: no other run ranks a block)
                self._run_of.clear()
            else:
                delete(self._run_of, live)
            self._push(live)
            return
        seen, index, head = run.seen, self._index, self._head
        live = [h for h in reversed(block_hashes) if h in seen and index.get(h, -1) >= head]
        if live:
            self._renew(live)
        if run.members:  # (none: what a run ranks it saw)
            self._renew(run.tail_first())

    def release(self, block_hashes: list[int], i: int, n: int) -> None:
        """The load `take` pinned blocks i..i+n for ended."""
        unpin(self.pins, block_hashes[i:i + n])

    def store_pins(self, block_hashes: list[int], new_keys: list[int], k: int) -> list[int]:
        """What a store in flight of the chunks `new_keys` (of the run `block_hashes`) pins here: their blocks."""
        if k == 1:
            return list(new_keys)
        ends = set(new_keys)
        return [h for j in range(k - 1, len(block_hashes), k) if block_hashes[j] in ends
                for h in block_hashes[j - k + 1:j + 1]]

    def clear(self) -> None:
        """Hold nothing (the process that held the blocks is gone); what it wrote and read stays counted."""
        self.pins.clear()
        self._index, self._log = {}, []
        self._base = self._head = self._holes = self._markers = self._held = self._runs = 0
        self._marks.clear()
        self._run_of.clear()
        self._passed.clear()


@dataclass(eq=False)
class ARCTier:
    """A CPU tier run by vLLM's ARC cache policy (kv_offload/cpu/policies/arc.py), behind `KVTier`'s interface.

    As vLLM does, it holds chunks keyed by their last block's hash (each chunk a copy of its own, so two
    chunks that begin with the same blocks both hold them) in two lists, least recently used first:
    T1, chunks stored and not reused since, and T2, chunks a later request reused (loaded, or offered
    again to the store while held); a reuse moves a chunk to T2's back. The ghost lists B1 and B2 keep
    the keys of the chunks evicted from T1 and T2 (each at most the tier's chunks long). Storing a chunk
    whose key is a ghost adapts `target_t1`, the size T1 aims at: up by max(1, |B2|/|B1|) on a B1 ghost
    (recency pays), down by max(1, |B1|/|B2|) on a B2 ghost, within 0..chunks. To make room, chunks go
    from T1's front while T1 holds at least int(target_t1) (counted down as it gives), else from T2's,
    else from T1's; never a chunk being loaded nor one the store offers. A store that cannot make room
    stores nothing (vLLM's prepare_store fails; the chunks it found held still count as reused).

    As vLLM does, a request's reuses (chunks it loaded, or offered while held, and did not store itself)
    and the order of the chunks it stored (head most recent) are applied once, when it finishes (`finish`,
    from `Offload.finish_requests`); a ghost adapts the target once per request (`misses`). A chunk whose
    copy is in flight is pinned (`Offload.stores_in_flight`)."""
    spec: TierSpec
    block_bytes: float     # one block across the instance's ranks
    blocks_per_chunk: int = 1
    stored: int = 0        # blocks written (whole chunks)
    loaded: int = 0        # blocks read back
    evicted: int = 0       # blocks dropped (whole chunks)
    capacity_blocks: int = 0
    capacity_chunks: int = 0
    target_t1: float = 0.0  # vLLM's target_t1_size, in chunks
    pins: dict = field(default_factory=dict, repr=False)  # chunk key -> loads reading it (never evicted meanwhile)
    stores: dict = field(default_factory=dict, repr=False)  # chunk key -> store jobs copying it: `Offload.storing`
    t1: OrderedDict = field(default_factory=OrderedDict, repr=False)  # key -> the chunk's block hashes
    t2: OrderedDict = field(default_factory=OrderedDict, repr=False)
    b1: OrderedDict = field(default_factory=OrderedDict, repr=False)  # key -> None
    b2: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _refs: dict = field(default_factory=dict, repr=False)  # block hash -> held chunks holding it

    def __post_init__(self) -> None:
        self.capacity_chunks = int(self.spec.capacity_bytes // (self.block_bytes * self.blocks_per_chunk))
        self.capacity_blocks = self.capacity_chunks * self.blocks_per_chunk

    @property
    def num_held(self) -> int:
        return (len(self.t1) + len(self.t2)) * self.blocks_per_chunk

    @property
    def usage(self) -> float:
        return self.num_held / self.capacity_blocks if self.capacity_blocks else 0.0

    @property
    def blocks(self) -> dict[int, None]:
        """The blocks held: T1's chunks', then T2's, least recently used first (for tests and inspection)."""
        return dict.fromkeys(h for chunks in (self.t1, self.t2) for chunk in chunks.values() for h in chunk)

    def holds(self, block_hash: int) -> bool:
        return block_hash in self._refs

    def holds_chunk(self, key: int) -> bool:
        """The chunk whose last block is `key` is held."""
        return key in self.t1 or key in self.t2

    def holds_none(self, keys: list[int]) -> bool:
        """None of the chunks whose last blocks are `keys` is held."""
        return self.t1.keys().isdisjoint(keys) and self.t2.keys().isdisjoint(keys)

    def put_many(self, block_hashes: list[int], misses: set[int] | None = None, request: object = None,
                 positions: object = None) -> list[int] | None:
        """A store of whole chunks (vLLM's prepare_store): the chunks not held go to T1's back, head first
        (the request's end reorders them), after a ghost adapted `target_t1` (a key in `misses` has already
        adapted it for its request; the others are added to it) and room was made; those held stay where
        they are (a reuse the request's end applies). Returns the blocks pushed out (no chunk holds them
        any more), in order; None when no room could be made (nothing is stored). (`request` and
        `positions`, an LRU tier's, are not used: ARC applies a request's order at its end.)"""
        k = self.blocks_per_chunk
        t1, t2, b1, b2, refs = self.t1, self.t2, self.b1, self.b2, self._refs
        keys = block_hashes[k - 1::k]
        reused = [key for key in keys if key in t1 or key in t2]
        new = {key: j for j, key in enumerate(keys) if key not in t1 and key not in t2}  # key -> chunk index
        if misses is None:
            observed = list(reversed(new))
        else:
            observed = [key for key in reversed(new) if key not in misses]
            misses.update(observed)
        ghosts = [key for key in observed if key in b1 or key in b2] if b1 or b2 else []
        for key in ghosts:  # vLLM's on_store_miss, tail first
            self._ghost_hit(key)
        victims = self._evict(len(new) - (self.capacity_chunks - len(t1) - len(t2)), reused)
        if victims is None:
            return None
        for key in new:
            if key in b1 or key in b2:
                b1.pop(key, None)
                b2.pop(key, None)
        if k == 1:  # a chunk is its block, which no other chunk holds
            t1.update(zip(new, zip(new)))
            refs.update(dict.fromkeys(new, 1))
        else:
            for key, j in new.items():
                chunk = tuple(block_hashes[j * k:j * k + k])
                t1[key] = chunk
                for h in chunk:
                    refs[h] = refs.get(h, 0) + 1
        self.stored += len(new) * k
        self.evicted += len(victims) * k
        if k == 1:
            pushed = [chunk[0] for chunk in victims]
            for h in pushed:
                del refs[h]
            return pushed
        for chunk in victims:
            for h in chunk:
                refs[h] -= 1
        pushed = []
        for chunk in victims:
            for h in chunk:
                if refs.get(h) == 0:
                    del refs[h]
                    pushed.append(h)
        return pushed

    def take(self, block_hashes: list[int], i: int, n: int) -> None:
        """Blocks i..i+n of a request are being loaded from here (vLLM's prepare_load): the chunks they lie
        in are pinned (their reuse is applied when the request finishes)."""
        pin(self.pins, self._chunk_keys(block_hashes, i, n))
        self.loaded += n

    def release(self, block_hashes: list[int], i: int, n: int) -> None:
        """The load `take` pinned the chunks of blocks i..i+n for ended (vLLM's complete_load)."""
        unpin(self.pins, self._chunk_keys(block_hashes, i, n))

    def store_pins(self, block_hashes: list[int], new_keys: list[int], k: int) -> list[int]:
        """What a store in flight of the chunks `new_keys` pins here: the chunks (by key)."""
        return list(new_keys)

    def finish(self, keys: list[int], inserted: set[int], reused: set[int]) -> None:
        """A request that saw these chunks (their keys, head to tail) finished, having stored `inserted`
        and reused `reused` (vLLM's ARC on_request_finished), tail first so the head ends most recent: a
        chunk it only stored goes to its list's back; one it reused from T1 to T2, or to T2's back."""
        t1, t2 = self.t1, self.t2
        for key in reversed(keys):
            if key in reused:
                if key in t1:
                    t2[key] = t1.pop(key)
                elif key in t2:
                    t2.move_to_end(key)
            elif key in inserted:
                if key in t1:
                    t1.move_to_end(key)
                elif key in t2:
                    t2.move_to_end(key)

    def clear(self) -> None:
        """Hold nothing, and remember no ghost (the process that held the chunks is gone); what it wrote and
        read stays counted."""
        for table in (self.pins, self.t1, self.t2, self.b1, self.b2, self._refs):
            table.clear()
        self.target_t1 = 0.0

    def _chunk_keys(self, block_hashes: list[int], i: int, n: int) -> list[int]:
        """The keys of the chunks that end within blocks i..i+n (a load's run ends on a chunk's end)."""
        k = self.blocks_per_chunk
        return block_hashes[i - i % k + k - 1:i + n:k]

    def _ghost_hit(self, key: int) -> None:
        """A chunk about to be stored was evicted not long ago: adapt T1's target towards the list it left."""
        b1, b2 = self.b1, self.b2
        if key in b1:
            self.target_t1 = min(self.target_t1 + max(1, len(b2) / len(b1)), self.capacity_chunks)
            b1.move_to_end(key)
        elif key in b2:
            self.target_t1 = max(self.target_t1 - max(1, len(b1) / len(b2)), 0)
            b2.move_to_end(key)

    def _evict(self, n: int, protected: list[int]) -> list[tuple[int, ...]] | None:
        """Make room for n chunks (vLLM's ARCCachePolicy.evict): the chunks evicted, their keys now ghosts;
        None (and nothing changed) when fewer than n chunks are idle and not `protected`."""
        if n <= 0:
            return []
        pins, stores, t1, t2 = self.pins, self.stores, self.t1, self.t2
        target = int(self.target_t1)
        if not (pins or stores or protected):  # every chunk idle: T1 gives while it holds target, then T2, then T1
            first = min(n, max(0, len(t1) - max(target, 1) + 1))
            second = min(n - first, len(t2))
            if n - first - second > len(t1) - first:
                return None
            victims = []
            phases = ((t1, self.b1, first), (t2, self.b2, second), (t1, self.b1, n - first - second))
            for entries, ghosts, count in phases:
                gone = [entries.popitem(False) for _ in range(count)]
                ghosts.update(dict.fromkeys(key for key, _ in gone))
                victims += [chunk for _, chunk in gone]
        else:
            protected = set(protected)
            idle_t1 = (key for key in t1 if key not in pins and key not in stores and key not in protected)
            idle_t2 = (key for key in t2 if key not in pins and key not in stores and key not in protected)
            t1_size, chosen = len(t1), []
            for _ in range(n):
                key = next(idle_t1, None) if t1_size >= target else None
                if key is None:
                    key = next(idle_t2, None)
                    if key is not None:
                        chosen.append((key, False))
                        continue
                    key = next(idle_t1, None)
                    if key is None:
                        return None
                chosen.append((key, True))
                t1_size -= 1
            victims = []
            for key, from_t1 in chosen:
                if from_t1:
                    victims.append(t1.pop(key))
                    self.b1[key] = None
                else:
                    victims.append(t2.pop(key))
                    self.b2[key] = None
        for ghosts in (self.b1, self.b2):
            for _ in range(len(ghosts) - self.capacity_chunks):
                ghosts.popitem(last=False)
        return victims


Tier = KVTier | ARCTier
TIER_POLICIES = {"lru": KVTier, "arc": ARCTier}  # OffloadingConnector's eviction_policy: its CPU tier's class


@dataclass(eq=False)
class RequestOffload:
    """One request's part in an engine's own offload, as vLLM's OffloadingConnector scheduler and CPU manager
    keep it from the request's arrival to its end (across preemptions)."""
    next_block: int = 0       # blocks offered to the store so far (vLLM's next_stored_chunk_idx, in blocks)
    first: int | None = None  # the first block it loaded or offered ...
    last: int = 0             # ... and the end of those (its end orders the chunks in between)
    inserted: set = field(default_factory=set)  # chunk keys it stored (kept for an ARC tier, whose end reads them)
    reused: set = field(default_factory=set)    # chunk keys it loaded or offered while held, not stored itself (ARC)
    misses: set = field(default_factory=set)    # chunk keys whose ghost has adapted ARC's target for it
    failed_now: bool = False  # its store failed in this step's offer (so this step's `retry` passes it over)
    jobs: int = 0             # its store jobs not reported done (vLLM's transfer_jobs: a lookup waits for them)
    rank: RequestRun | None = None  # its rank in the nearest tier, an LRU one (vLLM's _RequestRank), once it has one

    def touched(self, start: int, end: int) -> None:
        """It loaded or offered blocks start..end: its span (what its end orders) reaches them."""
        self.first = start if self.first is None else min(self.first, start)
        self.last = max(self.last, end)


@dataclass(eq=False)
class StoreJob:
    """A store's copy to the nearest tier (vLLM's store job, on the GPU-to-host direction of the link). Its
    chunks are in the tier but neither readable (a lookup that reaches one is deferred: vLLM's HIT_PENDING)
    nor evictable until the scheduler learns the copy ended (vLLM's complete_store, from a step's output)."""
    state: RequestOffload | None  # the request that stored (None: not one an engine tracks)
    keys: list[int]       # the chunks it copies (by their last block's hash)
    pins: list[int]       # what it pins in the tier's `pins` while in flight ([]: the tier reads `storing`)
    added: list[int]      # the blocks the tier reports stored once the copy ends (on_change; [] when nobody asks)
    num_blocks: int
    created: float        # the virtual time of the step that built it
    start: float = 0.0
    end: float = 0.0
    distinct: bool = False  # its pins and its keys are each without repeats (their unpin skips the check)


@dataclass(eq=False)
class Offload:
    """A chain of tiers (first: nearest), as one engine's, or a node's shared pool.

    An engine's own chain follows vLLM's OffloadingConnector request by request (`RequestOffload`): on each
    admission a request offers its chunks from chunk 0 (after a load from the tiers: from the load's end),
    including those of its GPU prefix hit; a store the nearest tier finds no room for (it is all or
    nothing) stores nothing and is offered again, with the chunks filled since, each step the request
    runs. When it finishes, its last offer (what it still owes) and the end of its cache access (what it
    reused and stored becomes the most recently used) come at the next step, after that step's own offers,
    as vLLM's scheduler does them for the step's finished_req_ids. A shared pool (LMCache's) stores what
    each request computed past its prefix hit.

    With `stores_in_flight` (an engine's own chain), a store takes time, as vLLM's worker runs it: each
    step's store jobs start when the step's compute ends (vLLM submits them at the start of the next step, on
    a stream that waits for the compute stream; with async scheduling a step scheduled while another runs
    has its jobs started when that one ends, up to a step early), one after another (its GPU-to-host
    transfers run in submission order), each taking the link's latency plus its bytes over the `lanes`
    GPUs' host links; the scheduler learns a job ended at the first step output at or after its end
    (`step_ended`), or, the engine idle (vLLM steps on while store jobs are pending), at the next schedule
    (`advance`). The scheduler must tell it the time (`advance` at each schedule, `step_ended` at each
    step's output)."""
    tiers: list[Tier]
    shared: bool = False
    prompt_only: bool = False  # offload_prompt_only: only the blocks a prompt fills are stored
    blocks_per_chunk: int = 1  # blocks stored and loaded together
    store_threshold: int = 0   # a chunk not held is stored once offered this many times (< 2: at once)
    max_tracker_size: int = 64_000  # chunks whose offers are counted (store_threshold >= 2)
    stores_in_flight: bool = False  # stores take time over the nearest tier's link (see above); else at once
    lanes: int = 1         # GPUs copying a block's shards side by side, each over its own host link (TP)
    # the engine's GPU prefix caching is on: a lookup waits while another request loads a chunk it would load
    # (the blocks will be in the GPU prefix cache then); vLLM keeps _chunks_being_loaded only then
    prefix_caching: bool = True
    hits: int = 0          # prompt tokens loaded from the tiers
    stores_skipped: int = 0  # chunks not stored for want of offers (vLLM's vllm:kv_offload_stores_skipped)
    allocation_failures: int = 0  # stores the nearest tier found no room for (vllm:kv_offload_allocation_failure)
    lookups: int = 0       # scheduling attempts that looked the tiers up (vLLM's get_num_new_matched_tokens)
    # called for each store that needs room in the nearest tier (vLLM's prepare_store with chunks to
    # allocate) with the chunks it needs and the blocks it copied there (0: no room, nothing stored)
    store_listeners: list[Callable[[int, int], None]] = field(default_factory=list)
    # called after each store with [(tier, blocks it now holds that it did not, blocks it pushed out)], tiers
    # in order, those a store changed (None: nobody asks, and a store does not work it out); with
    # stores_in_flight, the nearest tier's new blocks are reported when their copy ends (vLLM's complete_store)
    on_change: Callable[[list[tuple[Tier, list[int], list[int]]]], None] | None = None
    # called with each store job the scheduler learns ended (vLLM's worker records a store's size and time in
    # get_finished, and the step's output brings them to the scheduler's stats); without stores_in_flight, as
    # each store is made, its copy timed as the link would take it
    job_listeners: list[Callable[[StoreJob], None]] = field(default_factory=list)
    # chunk key -> offers, least recently offered first (None: store_threshold < 2)
    offers: OrderedDict | None = field(default=None, repr=False)
    requests: dict = field(default_factory=dict, repr=False)  # request -> its RequestOffload (not shared)
    failed: dict = field(default_factory=dict, repr=False)    # the requests whose last store failed -> theirs
    # requests that finished, their last offer and cache-access end due at the next step:
    # (request, its RequestOffload, block hashes, full blocks, prompt blocks, when it finished)
    finishing: list = field(default_factory=list, repr=False)
    now: float = 0.0       # the engine's virtual time, as its scheduler last told
    queued: list = field(default_factory=list, repr=False)     # store jobs whose step has not ended
    in_flight: deque = field(default_factory=deque, repr=False)  # store jobs running, in order of their end
    storing: dict = field(default_factory=dict, repr=False)    # chunk key -> store jobs copying it
    loading: dict = field(default_factory=dict, repr=False)    # chunk key -> loads reading it (not shared)
    link_free: float = 0.0  # when the last store job started ends
    deferred: dict = field(default_factory=dict, repr=False)   # request -> when a lookup first deferred it
    # vLLM's vllm:kv_offload_lookup_async_delay_seconds: for each request a lookup deferred, the time from
    # its first deferral to the lookup that was not (or to its end), not yet taken by a reader. Its reader,
    # server.connector_metrics, listens to the stores (store_listeners) and takes them all at each scrape;
    # with no store listener nobody reads them (an offline replay), and only the last UNREAD_DELAYS_KEPT stay
    async_delays: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.store_threshold >= 2:
            self.offers = OrderedDict()
        nearest = self.tiers[0]
        if self.stores_in_flight and (self.blocks_per_chunk == 1 or isinstance(nearest, ARCTier)):
            nearest.stores = self.storing  # (its store pins are the chunks being stored: kept once, not twice)
        if not self.shared and isinstance(self.tiers[0], KVTier):
            self.tiers[0].all_or_nothing = True  # vLLM's CPU manager: a store gets all its chunks or none
            self.tiers[0].by_request = True      # and its LRU policy ranks a running request's chunks by it

    @property
    def step_work(self) -> bool:
        """A step owes something: a failed store to offer again, or a finished request's end."""
        return bool(self.failed or self.finishing)

    def admit(self, request: object, block_hashes: list[int] | None = None, load_start: int = 0,
              load_end: int = 0) -> None:
        """The request was admitted (vLLM's get_num_new_matched_tokens and update_state_after_alloc), with
        blocks load_start..load_end loaded from the tiers if any: its next store offers its chunks from
        chunk 0, or from the end of the load (whose chunks it reused)."""
        if self.shared:
            return
        state = self.requests.get(request)
        if state is None:
            state = self.requests[request] = RequestOffload()
        k = self.blocks_per_chunk
        state.next_block = -(-load_end // k) * k
        if load_end > load_start:
            state.touched(load_start, load_end)
            if isinstance(self.tiers[0], KVTier):
                self.tiers[0].access(state, block_hashes, load_start, load_end - load_start)
            else:  # (ARC's request end tells reuses from stores; LRU's ranks what the request saw)
                state.reused.update(key for key in block_hashes[load_start - load_start % k + k - 1:load_end:k]
                                    if key not in state.inserted)

    def store_full_blocks(self, block_hashes: list[int], done: int, full: int, prompt_blocks: int,
                          request: object = None) -> None:
        """A request's blocks `done`..`full` (of `block_hashes`, all of its blocks) just became full on a
        GPU, where its first `prompt_blocks` hold only prompt tokens: store the chunks now whole (with
        prompt_only, of the prompt's blocks only), from where the request's offers stand (a shared pool,
        or no request: from `done`). A chunk left incomplete by the last call comes again."""
        end = self._storable(full, prompt_blocks)
        if request is None or self.shared:
            start = done - done % self.blocks_per_chunk
            if end > start:
                self.store(block_hashes[start:end])
            return
        state = self.requests.get(request)
        if state is None:
            state = self.requests[request] = RequestOffload()
        elif request in self.failed:
            return  # `retry` offers them all at the end of the step
        self._offer(request, state, block_hashes, end)

    def retry(self, request: object, block_hashes: list[int], full: int, prompt_blocks: int) -> None:
        """A step ran the request, whose last store failed: offer what it has not stored again (vLLM's
        _build_store_jobs does each step, from next_stored_chunk_idx)."""
        state = self.failed.get(request)
        if state is None:
            return
        if not state.failed_now:  # (a store that failed in this step's own offer waits for the next step)
            self._offer(request, state, block_hashes, self._storable(full, prompt_blocks))
        state.failed_now = False

    def request_finished(self, request: object, block_hashes: list[int], full: int, prompt_blocks: int) -> None:
        """A request whose first `full` blocks were full finished: its last offer (a store it still owes)
        and the end of its cache access come at the next step (`finish_requests`), as vLLM's scheduler
        builds them for the step's finished_req_ids; a lookup that had deferred it is observed now."""
        if self.shared:
            return
        self._observe_deferral(request)
        state = self.requests.pop(request, None)
        if state is not None:
            self.finishing.append((request, state, block_hashes, full, prompt_blocks, self.now))

    def finish_requests(self, before: float | None = None) -> None:
        """The step's finished requests (those that finished before `before`, when given): a store they
        still owe is offered once more, then the chunks each used are the most recently used, its head most
        (vLLM's CPU offloading on_request_finished: ARC's reuses, LRU's order)."""
        if not self.finishing:
            return
        due = [entry for entry in self.finishing if before is None or entry[5] < before]
        if not due:
            return
        self.finishing = [entry for entry in self.finishing if before is not None and entry[5] >= before]
        k = self.blocks_per_chunk
        for request, state, block_hashes, full, prompt_blocks, at in due:
            if request in self.failed:
                del self.failed[request]
                self._offer(request, state, block_hashes, self._storable(full, prompt_blocks), at)
            first, last = state.first, state.last
            if first is None:
                continue
            for tier in self.tiers:
                if isinstance(tier, ARCTier):
                    tier.finish(block_hashes[first - first % k + k - 1:last:k], state.inserted, state.reused)
                else:
                    tier.refresh(block_hashes[first:last], state if tier.by_request else None)

    def clear(self) -> None:
        """An engine's own chain forgets everything (its pod restarted: its host and CXL memory held by a new
        process; its store jobs are gone with it); a node's shared pool, another process, keeps what it holds."""
        if self.shared:
            return
        for tier in self.tiers:
            tier.clear()
        for table in (self.requests, self.failed, self.finishing, self.queued, self.in_flight, self.storing,
                      self.loading, self.deferred):
            table.clear()
        self.link_free = self.now
        if self.offers is not None:
            self.offers.clear()

    # -- the virtual clock of store jobs ---------------------------------------------------------------------
    def advance(self, now: float) -> None:
        """A schedule at `now`: what the engine, idle since its last step, did meanwhile (vLLM steps on while
        store jobs are pending): the last offers of requests that finished then, their jobs and those of the
        last step started; then the jobs ended by now are reported."""
        self.now = max(self.now, now)
        self.finish_requests(before=now)
        self._start([job for job in self.queued if job.created < now])
        self._complete(now)

    def step_ended(self, end: float) -> None:
        """A step's output came back at `end`: the store jobs of the steps scheduled so far start (vLLM
        submits them at the next step's start, behind its compute stream); those ended by now are reported
        (the step's get_finished)."""
        self.now = max(self.now, end)
        self._start(self.queued, end)
        self._complete(end)

    @property
    def unwatched(self) -> bool:
        """Does nothing but its own engine's schedules read when its store jobs end (no node's shared pool, KV
        events or store/job listeners)? Then an idle engine need not wake for them (EngineLoop._wait_for_stores)."""
        return not (self.shared or self.on_change is not None or self.job_listeners or self.store_listeners)

    def idle_until(self, now: float) -> float | None:
        """The engine has no step to run at `now` (vLLM's steps on while store jobs are pending): the requests
        that finished make their last offers, the queued store jobs start, those ended are reported; returns
        when the next job in flight ends (None: none is)."""
        self.now = max(self.now, now)
        self.finish_requests()
        self._start(self.queued)
        self._complete(now)
        return self.in_flight[0].end if self.in_flight else None

    def _start(self, jobs: list[StoreJob], at: float | None = None) -> None:
        """Start `jobs` (queued, in order) at `at` (None: when each was built), one after another on the link."""
        if not jobs:
            return
        spec, block_bytes = self.tiers[0].spec, self.tiers[0].block_bytes
        rate = self.lanes * spec.bandwidth
        if jobs is self.queued:
            self.queued = []
        else:
            started = set(map(id, jobs))
            self.queued = [job for job in self.queued if id(job) not in started]
        for job in jobs:
            job.start = max(job.created if at is None else at, self.link_free)
            job.end = self.link_free = job.start + spec.latency + job.num_blocks * block_bytes / rate
            self.in_flight.append(job)

    def _complete(self, now: float) -> None:
        """Report the store jobs ended by `now` (vLLM's complete_store): their chunks readable and evictable."""
        in_flight = self.in_flight
        if not in_flight or in_flight[0].end > now:
            return
        nearest, storing, added = self.tiers[0], self.storing, []
        while in_flight and in_flight[0].end <= now:
            job = in_flight.popleft()
            if job.pins:
                unpin(nearest.pins, job.pins, job.distinct)
            unpin(storing, job.keys, job.distinct)
            if job.state is not None:
                job.state.jobs -= 1
            added += job.added
            for listener in self.job_listeners:
                listener(job)
        if self.on_change is not None and added:
            self.on_change([(nearest, added, [])])

    def _observe_deferral(self, request: object) -> None:
        since = self.deferred.pop(request, None)
        if since is not None:
            delays = self.async_delays
            delays.append(self.now - since)
            if len(delays) > 2 * UNREAD_DELAYS_KEPT and not self.store_listeners:
                del delays[:-UNREAD_DELAYS_KEPT]

    # -- offers ------------------------------------------------------------------------------------------------
    def _storable(self, full: int, prompt_blocks: int) -> int:
        """The end of the blocks a request may store, whole chunks, when its first `full` are full."""
        end = min(full, prompt_blocks) if self.prompt_only else full
        return end - end % self.blocks_per_chunk

    def _offer(self, request: object, state: RequestOffload, block_hashes: list[int], end: int,
               at: float | None = None) -> None:
        start = state.next_block
        if end <= start:
            return
        if self.store(block_hashes[start:end], state, start, at):
            state.next_block = end
            self.failed.pop(request, None)
        elif request not in self.failed:
            state.failed_now = True
            self.failed[request] = state

    def store(self, block_hashes: list[int], request: RequestOffload | None = None, start: int = 0,
              at: float | None = None) -> bool:
        """Full blocks just cached on a GPU, whole chunks offered to the store (by `request`, from its
        block `start` on, in the step at `at`: now if None): copy them down (with store_threshold, those
        held or offered often enough; chunks whose copy is still in flight are passed over, as vLLM's
        prepare_store does); what a tier pushes out goes one tier lower (past the last, it is gone). False
        when the nearest tier found no room for them: nothing was stored."""
        offered = len(block_hashes)
        first = self.tiers[0]
        ranked_by = request if getattr(first, "by_request", False) else None  # (an LRU tier ranks requests)
        offered_hashes = block_hashes
        if self.offers is not None:
            block_hashes = self._admitted(block_hashes)
        k = self.blocks_per_chunk
        if self.storing and not self.storing.keys().isdisjoint(block_hashes[k - 1::k]):
            storing = self.storing
            block_hashes = [h for j in range(k - 1, len(block_hashes), k) if block_hashes[j] not in storing
                            for h in block_hashes[j - k + 1:j + 1]]
        new_keys = None
        none_held = False
        arc = request is not None and isinstance(first, ARCTier)  # (its request's end needs what it stored)
        if request is not None:
            request.touched(start, start + offered)
        if self.store_listeners or self.stores_in_flight or self.job_listeners or arc:
            keys = block_hashes[k - 1::k]
            if first.holds_none(keys):  # (the common case: a store of new chunks)
                new_keys, held = keys, []
                none_held = k == 1  # (a chunk is its block: no block is held)
            else:
                new_keys, held = [], []
                holds = first.holds_chunk
                for key in keys:
                    (held if holds(key) else new_keys).append(key)
            if arc and held:  # (ARC's request end tells reuses from stores; LRU's does not)
                request.reused.update(key for key in held if key not in request.inserted)
        misses = request.misses if request is not None else None
        positions = None
        if ranked_by is not None:  # the positions in the request of the blocks stored
            if block_hashes is offered_hashes:
                positions = range(start, start + offered)
            else:
                position = dict(zip(offered_hashes, range(start, start + offered)))
                positions = [position[h] for h in block_hashes]
        stored = first.stored
        if self.on_change is not None:
            ok, added = self._store_reporting(block_hashes, misses, ranked_by, positions)
        else:
            added = []
            if ranked_by is not None:  # (an LRU tier, which may skip its own look at what it holds)
                pushed = first.put_many(block_hashes, misses, ranked_by, positions, none_held)
            else:
                pushed = first.put_many(block_hashes, misses, ranked_by, positions)
            ok = pushed is not None
            for tier in self.tiers[1:]:
                if not pushed:
                    break
                pushed = tier.put_many(pushed)
        if not ok:
            self.allocation_failures += 1
        elif arc and new_keys:
            request.inserted.update(new_keys)
        if new_keys and self.store_listeners:
            for listener in self.store_listeners:
                listener(len(new_keys), first.stored - stored)
        if ok and new_keys:
            if self.stores_in_flight:
                self._queue(block_hashes, new_keys, added, request, at)
            elif self.job_listeners:
                self._copied_at_once(new_keys, at)
        return ok

    def _queue(self, block_hashes: list[int], new_keys: list[int], added: list[int],
               request: RequestOffload | None, at: float | None) -> None:
        """A store job for the chunks a store just put in the nearest tier (`new_keys`), pinned there."""
        nearest = self.tiers[0]
        k = self.blocks_per_chunk
        pins = [] if nearest.stores is self.storing else nearest.store_pins(block_hashes, new_keys, k)
        distinct = pin(self.storing, new_keys) & (not pins or pin(nearest.pins, pins))
        if request is not None:
            request.jobs += 1
        self.queued.append(StoreJob(request, new_keys, pins, added, len(new_keys) * k,
                                    self.now if at is None else at, distinct=distinct))

    def _copied_at_once(self, new_keys: list[int], at: float | None) -> None:
        """A store without stores_in_flight is done as it is made: its job goes to the job listeners at once,
        its copy timed as the nearest tier's link would take it."""
        spec, block_bytes = self.tiers[0].spec, self.tiers[0].block_bytes
        job = StoreJob(None, new_keys, [], [], len(new_keys) * self.blocks_per_chunk, self.now if at is None else at)
        job.start = job.created
        job.end = job.start + spec.latency + job.num_blocks * block_bytes / (self.lanes * spec.bandwidth)
        for listener in self.job_listeners:
            listener(job)

    def _store_reporting(self, block_hashes: list[int], misses: set[int] | None, request: RequestOffload | None,
                         positions: Sequence[int] | None) -> tuple[bool, list[int]]:
        """`store`, working out what changed in each tier for `on_change`: a block a tier took is stored
        there, one it held before and pushed out is removed (one it took and pushed out at once, when a
        store outgrows the tier, was never there). With stores_in_flight, the nearest tier's new blocks
        are returned, not reported: their copy's end reports them."""
        changes = []
        incoming = block_hashes
        deferred: list[int] = []
        for tier in self.tiers:
            if not incoming:
                break
            new = {h: None for h in incoming if not tier.holds(h)}
            if tier is self.tiers[0]:
                pushed = tier.put_many(incoming, misses, request, positions)
            else:
                pushed = tier.put_many(incoming)
            if pushed is None:
                return False, []
            added = [h for h in new if tier.holds(h)]
            removed = [h for h in pushed if h not in new]
            if tier is self.tiers[0] and self.stores_in_flight:
                added, deferred = [], added
            if added or removed:
                changes.append((tier, added, removed))
            incoming = pushed
        if changes:
            self.on_change(changes)
        return True, deferred

    def _admitted(self, block_hashes: list[int]) -> list[int]:
        """The blocks of the offered chunks that store_threshold lets through: those offered at least
        store_threshold times, this offer included, and those the nearest tier holds (a reuse)."""
        k = self.blocks_per_chunk
        keys = block_hashes[k - 1::k]
        self._count_offers(keys)
        count, holds, threshold = self.offers.get, self.tiers[0].holds_chunk, self.store_threshold
        admitted = [key for key in keys if count(key, 0) >= threshold or holds(key)]
        self.stores_skipped += len(keys) - len(admitted)
        if k == 1:  # (a chunk is its block)
            return admitted
        admitted = set(admitted)
        return [h for j, key in enumerate(keys) if key in admitted for h in block_hashes[j * k:j * k + k]]

    def _count_offers(self, keys: list[int]) -> None:
        """One more offer of each chunk (vLLM's _record_accesses): a chunk counted moves to the back; new
        ones start at 1, in order, each pushing out the least recently offered once the table is full,
        but never a chunk this offer counted (when only those are left, the rest go uncounted)."""
        offers = self.offers
        counted = [key for key in dict.fromkeys(keys) if key in offers]
        for key in counted:
            offers.move_to_end(key)
            offers[key] += 1
        fresh = [key for key in dict.fromkeys(keys) if key not in offers]
        room = max(self.max_tracker_size - len(offers), 0)
        taken = min(len(fresh), room + len(offers) - len(counted))
        for _ in range(taken - room):
            offers.popitem(last=False)
        offers.update(dict.fromkeys(fresh[:taken], 1))

    # -- loads -------------------------------------------------------------------------------------------------
    def lookup(self, block_hashes: list[int], start: int, limit: int,
               request: object = None) -> list[tuple[Tier, int]] | None:
        """How the blocks from `start` on (at most `limit`) can be loaded: (tier, blocks) in order, the
        run of consecutive blocks some tier holds, each from the nearest tier holding it, ending on a
        chunk's end (a chunk is loaded whole or not at all), and none unless it is a chunk's worth of
        blocks at least (vLLM loads no less, nor looks up with less left than that). None: the look-up is
        deferred (vLLM's get_num_new_matched_tokens returns None and the scheduler asks again next step),
        because a chunk of the run is still being stored (HIT_PENDING), another request is loading one
        (vLLM's _chunks_being_loaded, with prefix caching on: once that load is done, the blocks are in the
        GPU prefix cache) or `request`'s own store jobs are in flight. Counts the look-up (`lookups`) and
        times `request`'s deferrals (`async_delays`); a request held back by its own store jobs is not
        looked up (vLLM returns before its lookup: no look-up observed, and no deferral timed)."""
        if self.held_by_own_stores(request):
            return None
        self.lookups += 1
        k = self.blocks_per_chunk
        end = start + limit
        end -= end % k  # (vLLM keys whole chunks only: a request's last partial chunk has no key)
        if end - start < k:  # (vLLM loads a chunk's worth at least: with less left, it looks nothing up)
            self._observe_deferral(request)
            return []
        parts: list[tuple[Tier, int]] = []
        tiers = self.tiers
        found = 0
        if len(tiers) == 1:  # (one tier, the common case: the run it holds, without a search per block)
            holds = tiers[0].holds
            for h in block_hashes[start:end]:
                if not holds(h):
                    break
                found += 1
            if found:
                parts.append((tiers[0], found))
        else:
            for h in block_hashes[start:end]:
                tier = next((t for t in tiers if t.holds(h)), None)
                if tier is None:
                    break
                found += 1
                if parts and parts[-1][0] is tier:
                    parts[-1] = (tier, parts[-1][1] + 1)
                else:
                    parts.append((tier, 1))
        over = (start + found) % k
        whole = start + found - over  # the end of the run's whole chunks
        keys = self._chunk_keys(block_hashes, start, whole) if whole > start and (self.storing or self.loading) else []
        if self.storing and not self.storing.keys().isdisjoint(keys):  # (HIT_PENDING)
            self._defer(request)
            return None
        if whole - start < k:  # a hit shorter than a chunk's worth of blocks is none (vLLM's new_num_hit_tokens)
            self._observe_deferral(request)
            return []
        # (a look-up for no request, as tests make, is not held back by a load)
        if request is not None and self.loading and not self.loading.keys().isdisjoint(keys):
            self._defer(request)
            return None
        while over and parts:  # drop the blocks of a chunk the run does not complete
            tier, n = parts.pop()
            if n > over:
                parts.append((tier, n - over))
            over = max(0, over - n)
        self._observe_deferral(request)
        return parts

    def held_by_own_stores(self, request: object) -> bool:
        """The request's own store jobs are in flight: vLLM's get_num_new_matched_tokens returns None before
        it looks anything up (its transfer_jobs), so the request waits without a look-up counted."""
        state = self.requests.get(request) if request is not None else None
        return state is not None and state.jobs > 0

    def _defer(self, request: object) -> None:
        """A look-up is deferred: the request's async-delay clock starts, unless it runs already."""
        if request is not None:  # (a look-up for no request, as tests make, is not timed)
            self.deferred.setdefault(request, self.now)

    def take(self, block_hashes: list[int], start: int, parts: list[tuple[Tier, int]]) -> None:
        """The blocks of `parts` are being loaded (the scheduler step that found them decided so, as vLLM's
        prepare_load): they are the most recently used now, and pinned until `release`: no store pushes
        them out meanwhile."""
        i = start
        for tier, n in parts:
            tier.take(block_hashes, i, n)
            i += n
        if self.prefix_caching and not self.shared:
            pin(self.loading, self._chunk_keys(block_hashes, start, i))

    def release(self, block_hashes: list[int], start: int, parts: list[tuple[Tier, int]]) -> None:
        """The load of `take`'s blocks ended (done, failed or cancelled): unpin them."""
        i = start
        for tier, n in parts:
            tier.release(block_hashes, i, n)
            i += n
        if self.prefix_caching and not self.shared:
            unpin(self.loading, self._chunk_keys(block_hashes, start, i))

    def _chunk_keys(self, block_hashes: list[int], start: int, end: int) -> list[int]:
        """The keys (last blocks' hashes) of the chunks blocks start..end reach into, whole chunks to `end`."""
        k = self.blocks_per_chunk
        return block_hashes[start + (k - 1 - start % k) % k:end:k]


@dataclass(eq=False)
class TierSource:
    """The tiers' part of a request's prompt: `parts` (tier, blocks) from block `start` on."""
    offload: Offload
    start: int
    parts: list[tuple[Tier, int]]

    @property
    def end(self) -> int:
        """The block after the last one loaded."""
        return self.start + sum(n for _, n in self.parts)
