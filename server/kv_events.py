"""`--kv-events-config`: each engine's KV cache events over ZeroMQ, as vLLM 0.33 publishes them.

The flag takes vLLM's JSON (`KVEventsConfig`: enable_kv_cache_events, publisher "zmq" or "null",
endpoint, replay_endpoint, buffer_steps, hwm, max_queue_size, topic), checked as vLLM checks it.
With events on and the zmq publisher, every engine (data-parallel rank r) gets a recorder on its
KV cache (emulator.kv_events: vLLM's block hashes) and a publisher like vLLM's ZmqEventPublisher:

- a PUB socket on `endpoint` with the port moved up by r (bound when the address has `*` or `::`
  or is ipc/inproc, else connected; `tcp://*:0` binds this node's IP on a free port), sending
  (topic, 8-byte big-endian sequence number, msgpack batch) per batch;
- a ROUTER socket on `replay_endpoint` (also offset by r) keeping the last `buffer_steps` batches:
  a subscriber sends the first sequence number it missed and gets every kept batch from there,
  then the end marker (empty topic, sequence -1, empty payload);
- one batch per engine step that changed the cache (what queued since the engine's previous step,
  stamped with the wall-clock time the step's output was due), a run of decode steps as one batch.
  As in vLLM, the AllBlocksCleared of a reset reaches subscribers with the engine's next step.
  An engine with its own offload tiers (--kv-offloading-size, native) also publishes their
  BlockStored / BlockRemoved (medium "CPU"), after the GPU's in each batch, as vLLM's
  OffloadingConnector does, one per chunk: its placeholder payload, or with the connector's
  kv_connector_extra_config `self_describing_kv_events` (read with bool(), as vLLM reads it) the
  chunk's hashes, parent, token ids, block size and LoRA (emulator.kv_events); a pool shared by a
  node's instances (lmcache) publishes none, as vLLM's LMCacheMPConnector.
- a model mixing sliding-window and full-attention layers (gpt-oss) publishes every KV cache group's
  events, each BlockStored with its group, kind and window, each BlockRemoved with the evicted block's
  group (group 0 the sliding window, 1 full attention; emulator.kv_events);
- a request sent with `"vllm_xargs": {"kv_cache_report_mode": "full"}` (a generate request: in its
  sampling_params' extra_args) has each prefix-cache hit reported too, as a BlockStored of its hit
  blocks, as vLLM does for gateways that learn a pod's cache from its events.

`/kv_event_sources` answers each rank's resolved config, as vLLM's API server does.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import queue
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import count
from typing import Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from emulator.engine import RunRecord, StepRecord
from emulator.kv_connectors import OFFLOADING, children
from emulator.kv_events import FULL_ATTENTION, MLA_ATTENTION, BlockHasher, KVEventRecorder, none_hash_seed
from emulator.request import Request

log = logging.getLogger("vllm_emulator.kv_events")


@dataclass(config=ConfigDict(extra="forbid"))
class KVEventsConfig:
    """vLLM's KVEventsConfig (vllm/config/kv_events.py): the same fields, defaults and checks."""
    enable_kv_cache_events: bool = False
    publisher: Literal["null", "zmq"] = None  # type: ignore[assignment]  # None: "zmq" if enabled, else "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher is None:
            self.publisher = "zmq" if self.enable_kv_cache_events else "null"
        if self.buffer_steps < 0:  # vLLM's publisher fails later, building its replay buffer (a deque's maxlen)
            raise ValueError(f"buffer_steps must be non-negative (the replay buffer keeps that many steps); "
                             f"got {self.buffer_steps}")


_HUMAN_NUMBER = re.compile(r"\b(\d+(?:\.\d+)?)([kKmMgGtT])\b")
_DECIMAL = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12}


def _expand_number(match: re.Match) -> str:
    number, suffix = match.groups()
    if suffix in _DECIMAL:
        return str(int(float(number) * _DECIMAL[suffix]))
    if "." in number:
        raise ValueError(f"Decimals are not allowed with binary suffixes like {suffix}. "
                         f"Did you mean to use {number}{suffix.lower()} instead?")
    return str(int(number) * 2 ** (10 * ("KMGT".index(suffix) + 1)))


_CONFIG = TypeAdapter(KVEventsConfig)


def parse_kv_events_config(text: str) -> KVEventsConfig:
    """The flag's value as vLLM reads it: JSON, numbers outside strings may carry k/M/... suffixes."""
    parts = re.split(r'("(?:[^"\\]|\\.)*")', text)
    try:
        for i in range(0, len(parts), 2):  # outside string literals
            parts[i] = _HUMAN_NUMBER.sub(_expand_number, parts[i])
        return _CONFIG.validate_json("".join(parts))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(repr(exc)) from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_json(config: KVEventsConfig) -> dict:
    return dataclasses.asdict(config)


# -- endpoints ---------------------------------------------------------------------------------
def offset_endpoint_port(endpoint: str | None, rank: int) -> str | None:
    """vLLM's ZmqEventPublisher.offset_endpoint_port: rank r publishes on the port r above the
    configured one (a port of 0 is left to the OS); an inproc name gets the suffix `_dp<r>`."""
    if not endpoint or rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{rank}"
    if "tcp" in endpoint:
        if ":" not in endpoint:
            return endpoint
        base, _, port = endpoint.rpartition(":")
        return endpoint if int(port) == 0 else f"{base}:{int(port) + rank}"
    raise ValueError("Invalid endpoint: must contain 'inproc' or 'tcp'")


def is_bind_endpoint(endpoint: str) -> bool:
    """Wildcard and ipc/inproc addresses are bound; the PUB socket connects to the others."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def node_ip() -> str:
    """vLLM's get_ip(): VLLM_HOST_IP, else the address of the interface that routes outwards."""
    if os.environ.get("VLLM_HOST_IP"):
        return os.environ["VLLM_HOST_IP"]
    for family, probe in ((socket.AF_INET, ("8.8.8.8", 80)), (socket.AF_INET6, ("2001:4860:4860::8888", 80))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(probe)  # sends nothing
                return s.getsockname()[0]
        except OSError:
            pass
    log.warning("Failed to get the IP address, using 0.0.0.0 by default. The value can be set by the "
                "environment variable VLLM_HOST_IP or HOST_IP.")
    return "0.0.0.0"


def _tcp_uri(ip: str, port: int) -> str:
    return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"


def _bind(sock, endpoint: str) -> str:
    """Bind; `tcp://*:0` binds this node's IP on a free port and returns the address bound."""
    import zmq
    if endpoint != "tcp://*:0":
        sock.bind(endpoint)
        return endpoint
    ip = node_ip()
    if ip in ("0.0.0.0", "::"):
        raise ValueError("tcp://*:0 needs a node IP; set VLLM_HOST_IP")
    if ":" in ip:
        sock.setsockopt(zmq.IPV6, 1)
    sock.bind(_tcp_uri(ip, 0))
    port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
    return _tcp_uri(ip, port)


# -- one engine's publisher --------------------------------------------------------------------
class ZmqEventPublisher:
    """PUB socket plus replay ROUTER socket, served by a thread of their own (vLLM's design): the
    event loop only queues (ts, events); the thread encodes, numbers, sends and answers replays."""

    END_SEQ = (-1).to_bytes(8, "big", signed=True)
    SHUTDOWN_TIMEOUT = 1.0

    def __init__(self, config: KVEventsConfig, rank: int, offset: int | None = None) -> None:
        """`rank`: the engine's data-parallel rank (in the batches); `offset`: how far its ports move
        up (its rank, as vLLM moves them; a cluster's engines move by their index in the cluster)."""
        import zmq
        self.rank = rank
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._topic = config.topic.encode()
        offset = rank if offset is None else offset
        endpoint = offset_endpoint_port(config.endpoint, offset)
        replay_endpoint = offset_endpoint_port(config.replay_endpoint, offset)
        # its own context, terminated at close: zmq closes a socket in its I/O thread after close() returns, so
        # only term() makes sure the ports are free again when the publisher has stopped (a restart binds them)
        ctx = self._ctx = zmq.Context()
        self._pub = ctx.socket(zmq.PUB)
        self._replay = None
        try:
            self._pub.set_hwm(config.hwm)
            if is_bind_endpoint(endpoint):
                endpoint = _bind(self._pub, endpoint)
            else:
                self._pub.connect(endpoint)
            if replay_endpoint is not None:
                self._replay = ctx.socket(zmq.ROUTER)
                # room for a whole replay and its end marker, however slowly the subscriber reads
                self._replay.setsockopt(zmq.SNDHWM, 2 * (config.buffer_steps + 1))
                replay_endpoint = _bind(self._replay, replay_endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(f"KV events of engine {offset}: {exc}") from None
        except ValueError:
            self._close_sockets()
            raise
        self.config = dataclasses.replace(config, enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint,
                                          replay_endpoint=replay_endpoint)
        self._running = True
        log.info("Starting ZMQ publisher thread")
        self._thread = threading.Thread(target=self._serve, daemon=True, name="zmq-publisher")
        self._thread.start()

    def publish(self, ts: float, events: list) -> None:
        if not self._running:
            raise RuntimeError("Publisher is closed")
        self._queue.put((ts, events))  # blocks when max_queue_size batches wait, as vLLM's engine does

    @property
    def drained(self) -> bool:
        """Every batch queued so far is taken by the thread (a replay request now finds it in the buffer)."""
        return self._queue.empty()

    def close(self) -> None:
        """Send what is queued (for up to a second), then stop the thread and close the sockets."""
        if not self._running:
            return
        self._running = False
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the thread stops once it has emptied the queue
            pass
        deadline = time.monotonic() + self.SHUTDOWN_TIMEOUT
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._queue.empty():
            log.warning("Warning: Queue still has %s items after %s seconds timeout", self._queue.qsize(),
                        self.SHUTDOWN_TIMEOUT)
        self._thread.join(timeout=self.SHUTDOWN_TIMEOUT)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()

    def _serve(self) -> None:
        from server.kv_event_wire import BatchEncoder
        encoder = BatchEncoder()
        seq = count()
        while True:
            if self._replay is not None and self._replay.poll(0):
                try:
                    self._answer_replay()
                except Exception:
                    log.exception("Error in replay")
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._running:
                    break
                continue
            if item is None:
                break
            n = next(seq)
            try:
                payload = encoder.encode(item[0], item[1], self.rank)
                self._pub.send_multipart((self._topic, n.to_bytes(8, "big"), payload))
                self._buffer.append((n, payload))
            except Exception:
                log.exception("Error in publisher thread")
                time.sleep(0.1)

    def _answer_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            log.warning("Invalid replay request: %s", frames)
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for n, payload in self._buffer:
            if n >= first:
                self._replay.send_multipart((client, b"", self._topic, n.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", self.END_SEQ, b""))


# -- every engine of a server ------------------------------------------------------------------
class KVEventPublishers:
    """The recorders and publishers of a server's engines, fed by the simulation's step reports.
    `epoch_of` turns a virtual time into the wall-clock time (seconds since the epoch) it is due.

    Each engine hashes as its deployment says (block size, --prefix-caching-hash-algo) and publishes
    as its instance's data-parallel rank; its ports move up by its index among the simulation's
    engines, which is its rank when one deployment is served."""

    def __init__(self, config: KVEventsConfig, sim, epoch_of: Callable[[float], float]) -> None:
        int_hashes = os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1") != "0"
        self._engines = list(sim.engines)
        self._ranks = [sim.instance_of[e.index].engines.index(e) for e in self._engines]
        self.recorders: list[KVEventRecorder] = []
        self.publishers: list[ZmqEventPublisher] = []
        self._epoch_of = epoch_of
        try:
            for engine, rank in zip(self._engines, self._ranks):
                self.publishers.append(ZmqEventPublisher(config, rank, offset=engine.index))
        except BaseException:
            self.close()
            raise
        for engine, publisher in zip(self._engines, self.publishers):
            deployment = sim.instance_of[engine.index].deployment
            algo = deployment.config.prefix_caching_hash_algo
            if algo.startswith("xxhash") and "PYTHONHASHSEED" not in os.environ:
                log.warning("Using a random per-process NONE_HASH seed because %s is not collision resistant. "
                            "Block hashes are therefore not reproducible across processes; set PYTHONHASHSEED to a "
                            "shared value to reuse the prefix cache across instances, or use sha256.", algo)
            # one per engine: each of vLLM's engine processes draws its own seed when it draws one (xxhash)
            hasher = BlockHasher(algo, none_hash_seed(algo, os.environ.get("PYTHONHASHSEED")))
            offload = engine.kv.offload
            recorder = KVEventRecorder(hasher, engine.config.block_size, int_hashes=int_hashes,
                                       spec_kind=MLA_ATTENTION if deployment.model.is_mla else FULL_ATTENTION,
                                       blocks_per_chunk=offload.blocks_per_chunk if offload is not None else 1,
                                       self_describing=self_describing_kv_events(deployment.config.kv_connectors.transfer))
            engine.kv.attach_events(recorder)
            if offload is not None and not offload.shared:  # vLLM's LMCacheMPConnector (a shared pool) emits none
                offload.on_change = recorder.tiers_changed
            self.recorders.append(recorder)
            log.info("KV events of engine %d: %s on %s%s", engine.index, algo, publisher.config.endpoint,
                     f", replay on {publisher.config.replay_endpoint}" if publisher.config.replay_endpoint else "")
        sim.add_listener(self._on_step, self._on_step)
        sim.add_finish_listener(self._on_finish, prefills=True)  # the cluster's P/D prefills end on their pods too
        sim.add_engine_down_listener(self._on_engine_down)

    def sources(self, engines: list[int] | None = None) -> dict[str, dict]:
        """/kv_event_sources: the resolved config of each engine (all, or those named by index), keyed
        by data-parallel rank; a port serving engines of several instances keys them by index."""
        chosen = range(len(self.publishers)) if engines is None else engines
        by_rank = len({self._ranks[e] for e in chosen}) == len(chosen)
        return {str(self._ranks[e] if by_rank else e): config_json(self.publishers[e].config) for e in chosen}

    def close(self) -> None:
        for engine in self._engines:
            engine.kv.attach_events(None)
            if engine.kv.offload is not None and not engine.kv.offload.shared:
                engine.kv.offload.on_change = None
        for publisher in self.publishers:
            publisher.close()

    def _on_step(self, record: StepRecord | RunRecord) -> None:
        recorder = self.recorders[record.engine]
        if recorder.has_events:
            end = record.end if isinstance(record, StepRecord) else record.ends[-1]
            self.publishers[record.engine].publish(self._epoch_of(end), recorder.take_events())

    def _on_finish(self, request: Request) -> None:
        if request.engine_index is not None:  # (a request no engine took has no events)
            self.recorders[request.engine_index].request_finished(request)

    def _on_engine_down(self, engine: int, now: float) -> None:
        self.recorders[engine].engine_failed()


def kv_cache_report_mode(extra_args: dict | None) -> str:
    """A request's kv_cache_report_mode as vLLM's Request takes it from its SamplingParams.extra_args (a chat or
    completion body's `vllm_xargs`, a generate request's own): "incremental" when unset. Only "full" changes
    anything (a prefix hit's blocks are reported again, emulator.kv_events); vLLM checks no other value."""
    return extra_args.get("kv_cache_report_mode", "incremental") if extra_args else "incremental"


def self_describing_kv_events(kv_transfer: dict | None) -> bool:
    """OffloadingConnector's `self_describing_kv_events` in a resolved KVTransferConfig (a MultiConnector's
    child's included), taken with bool() as vLLM's OffloadingSpec takes it (v1/kv_offload/base.py)."""
    return any(bool(child.get("kv_connector_extra_config", {}).get("self_describing_kv_events", False))
               for child in children(kv_transfer or {}) if child.get("kv_connector") == OFFLOADING)


def start_kv_event_publishers(config: KVEventsConfig | None, sim,
                              epoch_of: Callable[[float], float]) -> KVEventPublishers | None:
    """Publishers for `--kv-events-config`, or None when it publishes nothing (vLLM's warnings)."""
    if config is None:
        return None
    if config.enable_kv_cache_events and not all(e.config.enable_prefix_caching for e in sim.engines):
        log.warning("KV cache events are on, but prefix caching is not enabled. Use --enable-prefix-caching "
                    "to enable.")
    if config.publisher != "null" and not config.enable_kv_cache_events:
        log.warning("KV cache events are disabled, but the scheduler is configured to publish them. Modify "
                    "KVEventsConfig.enable_kv_cache_events to True to enable.")
    if not config.enable_kv_cache_events or config.publisher == "null":
        return None
    return KVEventPublishers(config, sim, epoch_of)
