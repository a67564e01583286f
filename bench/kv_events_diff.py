"""Differential check: our KV cache events against vLLM 0.33's own, batch by batch, byte for byte.

The workloads and the lock-step driver are bench/scheduler_diff.py's: our Scheduler and vLLM's
(Scheduler, or AsyncScheduler two batches deep) get the same arrivals with the same prompt and
output token ids. Here both KV caches also report events: ours through the recorder of
emulator/kv_events.py on the pool's hook, vLLM's through its own block pool with
`enable_kv_cache_events` (what its scheduler publishes from `update_from_output`). After every
processed step both sides' batches are encoded (ours by server/kv_event_wire.py, vLLM's by
msgspec from vLLM's own structs) and must be identical: the same BlockStored (hashes for the
`--prefix-caching-hash-algo`, parent hash, token ids, block size, medium, extra keys, group),
the same BlockRemoved in the same eviction order, the same AllBlocksCleared.

The `*_hybrid` workloads run gpt-oss's hybrid KV cache (a sliding-window group 0, a full-attention group
1, one block pool; emulator/sliding_window.py against vLLM's scheduler on a two-group KVCacheConfig):
both groups' BlockStored in vLLM's order (the sliding group's naming only the blocks it caches, with
kv_cache_spec_kind "sliding_window" and its window), and each eviction's BlockRemoved under the evicted
key's group. `--fuzz N --hybrid` runs random workloads on a hybrid KV cache of a random window.

    python bench/kv_events_diff.py [--vllm-python PATH] [--only NAME] [--algo ALGO] [--fuzz N [--hybrid]]
                                   [--report-mode full] [--json] [-v]

`--report-mode full` gives every request vLLM's extra arg kv_cache_report_mode "full": each prefix hit
found at admission is reported again as a BlockStored.

Like scheduler_diff.py it reruns itself with the vLLM venv's python when vLLM is not importable.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("scheduler_diff", BENCH / "scheduler_diff.py")
diff = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = diff  # its dataclasses look their module up
_spec.loader.exec_module(diff)

from emulator.kv_events import HASH_ALGOS  # noqa: E402  (the repository is on sys.path once scheduler_diff is)

ALGOS = ("sha256", "sha256_cbor")  # by default; the xxhash ones (the optional xxhash package) with --algo


class OurEvents(diff.OurSide):
    """Our scheduler with a recorder on its pool; requests arrive as Engine.add_request hands them in."""

    def __init__(self, engine, async_scheduling: bool, algo: str, seed: str, report_mode: str) -> None:
        import msgspec
        from emulator.kv_events import BlockHasher, KVEventRecorder
        from server.kv_event_wire import wire_event
        super().__init__(engine, async_scheduling)
        self.report_mode = report_mode
        self.recorder = KVEventRecorder(BlockHasher(algo, seed), engine.block_size)
        self.kv.attach_events(self.recorder)
        self._wire, self._encoder = wire_event, msgspec.msgpack.Encoder()
        self.batches: list[list[bytes]] = []

    def add(self, a, arrival_time: float) -> None:
        from emulator.block_hash import ensure_block_hashes
        request = self.requests[a.request_id] = diff._our_request(a, arrival_time)
        request.kv_cache_report_mode = self.report_mode
        ensure_block_hashes(request, self.kv.block_size)
        self.recorder.request_added(request)
        request.prompt_token_ids = request.output_token_ids = None
        self.scheduler.add_request(request)

    def update(self, handle) -> None:
        super().update(handle)
        _add_batch(self.batches, handle, [self._encoder.encode(self._wire(e)) for e in self.recorder.take_events()])


class _Capture:
    """Stands in for vLLM's event publisher: keeps the batch of the current update."""

    def __init__(self) -> None:
        self.events: list = []

    def publish(self, batch) -> None:
        self.events.extend(batch.events)

    def shutdown(self) -> None:
        pass


class VllmEvents(diff.VllmSide):
    """vLLM's scheduler with KV cache events on, hashing with `algo`."""

    def __init__(self, engine, async_scheduling: bool, algo: str, report_mode: str) -> None:
        import msgspec
        from vllm.utils.hashing import get_hash_fn_by_name
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        super().__init__(engine, async_scheduling)
        self.report_mode = report_mode
        hash_fn = get_hash_fn_by_name(algo)
        init_none_hash(hash_fn)
        self.block_hasher = get_request_block_hasher(engine.block_size, hash_fn)
        self.scheduler.kv_cache_manager.block_pool.enable_kv_cache_events = True
        self.scheduler.kv_cache_manager.enable_kv_cache_events = True  # (its prefix-hit reports)
        self.capture = self.scheduler.kv_event_publisher = _Capture()
        self._encoder = msgspec.msgpack.Encoder()
        self.batches: list[list[bytes]] = []

    def add(self, a, arrival_time: float) -> None:
        super().add(a, arrival_time)
        self.requests[a.request_id].kv_cache_report_mode = self.report_mode  # its SamplingParams.extra_args'

    def update(self, handle) -> None:
        super().update(handle)
        events, self.capture.events = self.capture.events, []
        _add_batch(self.batches, handle, [self._encoder.encode(e) for e in events])


def _add_batch(batches: list[list[bytes]], handle, batch: list[bytes]) -> None:
    """Keep the batch of a step that scheduled something, or that has events: an idle step's empty batch is
    not published (vLLM's `if events:`), and vLLM idles a step where ours does not (after aborts it schedules
    nothing once, to report them), which would shift the batches the sides compare."""
    if handle[-1].active or batch:
        batches.append(batch)


@dataclass
class Result:
    workload: str
    mode: str
    algo: str
    batches: int
    events: int
    stored: int
    removed: int
    first_divergence: dict | None
    errors: list[str]

    @property
    def agrees(self) -> bool:
        return self.first_divergence is None and all(e.endswith(diff.CAPPED) for e in self.errors)


def _decode(payload: bytes) -> dict:
    import msgspec
    return msgspec.msgpack.decode(payload)


def _none_hash_seed(algo: str) -> str:
    """The seed our hasher takes: ours as we resolve it, or, where ours is drawn at random (xxhash without
    PYTHONHASHSEED, as vLLM draws its own), the one vLLM just drew, so that what follows the seed is compared."""
    import os

    from vllm.v1.core.kv_cache_utils import get_none_hash_seed

    from emulator.kv_events import none_hash_seed
    ours = none_hash_seed(algo, os.environ.get("PYTHONHASHSEED"))
    if ours != get_none_hash_seed() and not (algo.startswith("xxhash") and "PYTHONHASHSEED" not in os.environ):
        raise AssertionError(f"our NONE_HASH seed {ours!r} is not vLLM's {get_none_hash_seed()!r}")
    return get_none_hash_seed()


def run(workload, mode: str, algo: str, report_mode: str = "incremental") -> Result:
    async_scheduling = diff.MODES[mode][0]
    theirs = VllmEvents(workload.engine, async_scheduling, algo, report_mode)
    ours = OurEvents(workload.engine, async_scheduling, algo, _none_hash_seed(algo), report_mode)
    errors = []
    for side, name in ((ours, "ours"), (theirs, "vllm")):
        _, err = diff.drive_lockstep(side, workload.arrivals, async_scheduling)
        if err:
            errors.append(f"{name}: {err}")
    first = None
    for i in range(max(len(ours.batches), len(theirs.batches))):
        # an update one side makes and the other does not (the drivers' last call) publishes nothing
        a = ours.batches[i] if i < len(ours.batches) else []
        b = theirs.batches[i] if i < len(theirs.batches) else []
        if a != b:
            k = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
            first = {"batch": i, "event": k, "ours": [_decode(e) for e in (a if k is None else a[k:k + 1])],
                     "vllm": [_decode(e) for e in (b if k is None else b[k:k + 1])]}
            break
    flat = [_decode(e) for batch in theirs.batches for e in batch]
    return Result(workload.name, mode, algo, len(theirs.batches), len(flat),
                  sum(len(e["block_hashes"]) for e in flat if e["type"] == "BlockStored"),
                  sum(e["type"] == "BlockRemoved" for e in flat), first, errors)


def run_all(only: list[str] | None, algos: list[str], fuzz: range | None = None,
            report_mode: str = "incremental", hybrid: bool = False) -> list[Result]:
    import logging
    logging.disable(logging.WARNING)
    results = []
    make = diff.random_hybrid_workload if hybrid else diff.random_workload
    for workload in (make(seed) for seed in fuzz) if fuzz is not None else diff.workloads():
        if only and workload.name not in only:
            continue
        for mode in ("sync", "async"):
            for algo in algos:
                results.append(run(workload, mode, algo, report_mode))
    return results


def print_table(results: list[Result], verbose: bool) -> None:
    print(f"{'workload':<30} {'mode':<6} {'algo':<12} {'batches':>8} {'events':>7} {'stored':>7} {'removed':>8}"
          f"  first divergence")
    for r in results:
        first = "-" if r.first_divergence is None else \
            f"batch {r.first_divergence['batch']}, event {r.first_divergence['event']}"
        print(f"{r.workload:<30} {r.mode:<6} {r.algo:<12} {r.batches:>8} {r.events:>7} {r.stored:>7} {r.removed:>8}"
              f"  {first}")
        for e in r.errors:
            print(f"{'':<40}error: {e}")
        if verbose and r.first_divergence:
            print(f"{'':<40}ours: {diff._short(r.first_divergence['ours'], 600)}")
            print(f"{'':<40}vllm: {diff._short(r.first_divergence['vllm'], 600)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", help="python of a venv with vLLM 0.33")
    parser.add_argument("--only", action="append", help="run only this workload (repeatable)")
    parser.add_argument("--algo", action="append", choices=HASH_ALGOS,
                        help="only this hash algorithm (repeatable; default: sha256 and sha256_cbor)")
    parser.add_argument("--fuzz", type=int, metavar="N", help="run N random workloads of scheduler_diff instead")
    parser.add_argument("--fuzz-seed", type=int, default=0)
    parser.add_argument("--hybrid", action="store_true",
                        help="with --fuzz: workloads on a hybrid KV cache (a sliding-window group, then full "
                             "attention)")
    parser.add_argument("--report-mode", choices=("incremental", "full"), default="incremental",
                        help="every request's kv_cache_report_mode (vLLM's extra arg; default: incremental)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="show both sides at the first divergence")
    args = parser.parse_args(argv)
    if not diff._vllm_importable():
        python = diff.find_vllm_python(args.vllm_python)
        if python is None:
            print("no vLLM venv found: pass --vllm-python or set VLLM_CPU_VENV", file=sys.stderr)
            return 2
        return subprocess.call([python, __file__, *(sys.argv[1:] if argv is None else argv)])
    fuzz = range(args.fuzz_seed, args.fuzz_seed + args.fuzz) if args.fuzz else None
    results = run_all(args.only, args.algo or list(ALGOS), fuzz, args.report_mode, args.hybrid)
    if args.json:
        print(json.dumps([{**r.__dict__, "agrees": r.agrees} for r in results], default=repr))
    else:
        print_table(results, args.verbose)
    return 0 if all(r.agrees for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
