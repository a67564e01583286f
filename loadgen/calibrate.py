"""Self-calibration: fit a few physical parameters of a device to your own vLLM runs.

    vllm-emulator calibrate RUN [RUN ...] [--trace FILE] [--model M --hardware HW FLAGS] [-o OVERLAY.yaml]

Each RUN is replayed as it ran (loadgen.vllm_runs: vLLM's per-request timestamps, a loadgen folder, a
/metrics scrape or vLLM's log with the trace it served), and these parameters of the device are fitted so
that the replays' statistics (TTFT, TPOT and E2E mean/p50/p90, or what the run measured) match:

    link_bandwidth    bytes/s  the bus bandwidth collectives reach on large messages (interconnect.bus_bandwidth)
    link_latency      s        a collective's per-hop latency (interconnect.latency)
    host_step         µs       host time per engine step (host.step_us)
    host_per_request  µs       host time per request in a step (host.per_request_us)
    decode_skew       -        share of the gap to the longest decode that mixed lengths cost (attention.decode_skew)

Only the parameters the runs constrain are fitted (one that moves no statistic by half its standard error
when it is multiplied or divided by e, or moved by a quarter of its range, is reported and left alone; a
single GPU has no link); the others stay as the device has them. The statistics are taken per window of
consecutive requests (`--windows`, 3 by default: a run's ramp-up, its steady part and its drain load the
GPUs differently, which tells the link's cost from the attention's), and the fit is weighted least squares
in units of each statistic's standard error (a bootstrap over the window's requests) by a Nelder-Mead
simplex (log scale for the link; restarted from its best point while that helps: a replay's statistics are
not smooth in its parameters), inside each parameter's bounds; the uncertainty is the covariance of that
fit from central differences over +-20 %, inflated by the misfit when the model cannot reach the runs.
Printed: the parameters with their 1-sigma uncertainty and correlations, the error of every statistic of
every run before and after, and the error on data held out of the fit: each run left out in turn, or,
with one run, each window (the replay stays whole; only what the fit sees changes). Written: a device
overlay (`base: HARDWARE` plus the fitted fields and a `calibration` record), which
`--hardware OVERLAY.yaml` or $VLLM_EMULATOR_HOME/hardware/ applies. Where the runs constrain none of the
parameters asked for, nothing is fitted: that is said, no overlay is written, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from emulator.cluster import build_simulation
from emulator.config import EngineArgs
from emulator.engine_flags import add_engine_args, engine_args_from
from emulator.hardware import DeviceSpec, UnknownHardwareError, device_from_dict, load_device
from emulator.models import UnknownModelError
from loadgen.output_paths import output_file_problem
from loadgen.vllm_runs import MeasuredRun, RunError, read_run, statistics
from profiles.cost_selection import NoProfileError
from profiles.deployment import build_deployment

DEFAULT_TRACE_DIRS = (Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "sharegpt",)


@dataclass(frozen=True)
class Parameter:
    name: str
    section: str  # where it lives in a device YAML
    key: str
    lower: float
    upper: float
    log: bool  # fitted on a log scale
    unit: str
    scale: float  # shown as value * scale, in `unit`

    def to_u(self, value: float) -> float:
        return math.log(value) if self.log else (value - self.lower) / (self.upper - self.lower)

    def from_u(self, u: float) -> float:
        value = math.exp(u) if self.log else self.lower + u * (self.upper - self.lower)
        return min(max(value, self.lower), self.upper)

    def show(self, value: float, sigma: float | None = None) -> str:
        text = f"{value * self.scale:.4g}"
        if sigma is not None:
            text += f" ± {sigma * self.scale:.2g}"
        return f"{text} {self.unit}".rstrip()


PARAMETERS = {p.name: p for p in (
    Parameter("link_bandwidth", "interconnect", "bus_bandwidth", 1e8, 2e12, True, "GB/s", 1e-9),
    Parameter("link_latency", "interconnect", "latency", 2e-7, 5e-4, True, "µs", 1e6),
    Parameter("host_step", "host", "step_us", 0.0, 20000.0, False, "µs", 1.0),
    Parameter("host_per_request", "host", "per_request_us", 0.0, 500.0, False, "µs", 1.0),
    Parameter("decode_skew", "attention", "decode_skew", 0.0, 1.0, False, "", 1.0),
)}
_U_STEP = {True: 0.2, False: 0.05}  # derivative steps: 20 % of the value (log), 5 % of the range
_REACH = {True: 1.0, False: 0.25}  # probes and first search steps: a factor e (log), a quarter of the range
UNCONSTRAINED = 0.5  # a parameter moving no statistic by this many standard errors over its range


def current_values(device: DeviceSpec, skew: float) -> dict[str, float]:
    """The parameters as a device has them (`skew`: what its cost model applies)."""
    link, host = device.interconnect, device.host
    return {"link_bandwidth": link.bus_bandwidth, "link_latency": link.latency, "host_step": host.step_us,
            "host_per_request": host.per_request_us, "decode_skew": skew}


def overlay(base: str, values: dict[str, float]) -> dict:
    """A device overlay setting these parameters (a fitted link replaces the tables timed on the stock one)."""
    out: dict = {"base": base}
    for name, value in values.items():
        p = PARAMETERS[name]
        out.setdefault(p.section, {})[p.key] = float(value)
    if "interconnect" in out:
        out["interconnect"]["tables"] = False
    return out


def device_with(base: DeviceSpec, values: dict[str, float]) -> DeviceSpec:
    merged = dict(base.raw)
    for section, fields in overlay(base.name, values).items():
        if section != "base":
            merged[section] = {**(merged.get(section) or {}), **fields}
    return device_from_dict(merged, source=f"{base.name} (calibrating)")


# -- replaying ----------------------------------------------------------------------------------------------
class Replays:
    """Runs replayed on a device with given parameters (cached: a run's windows share its replay)."""

    def __init__(self, base: DeviceSpec) -> None:
        self.base = base
        self._cache: dict[tuple, list] = {}
        self.count = 0

    def statistics(self, run: MeasuredRun, values: dict[str, float]) -> dict[str, float]:
        key = (id(run.workload), run.model, run.engine_args, tuple(sorted(values.items())))
        finished = self._cache.get(key)
        if finished is None:
            finished = self._cache[key] = self._replay(run, values)
        return statistics(run, finished)

    def _replay(self, run: MeasuredRun, values: dict[str, float]) -> list:
        deployment = build_deployment(run.model, device_with(self.base, values), run.engine_args)
        sim = build_simulation(deployment, "least_loaded")
        finished: list = []
        sim.add_finish_listener(finished.append)
        sim.run(iter(run.requests(deployment.config.max_model_len)))
        self.count += 1
        return [r for r in finished if r.first_token_time is not None]

    def skew(self, run: MeasuredRun) -> tuple[float, bool]:
        """The decode skew the run's cost model applies on the stock device, and whether it was measured for
        the run's model (a per-model profile with a skew profile)."""
        cost = build_deployment(run.model, self.base, run.engine_args).cost_model
        measured = getattr(cost, "profile", None) is not None and "decode_skew" in cost.profile.meta
        return getattr(cost, "skew", 0.0), measured and self.base.attention_skew is None

    def residuals(self, runs: list[MeasuredRun], values: dict[str, float]) -> np.ndarray:
        """(replayed - measured) / standard error, of every statistic of every run."""
        out = []
        for run in runs:
            ours = self.statistics(run, values)
            out += [(ours[k] - v) / se for k, (v, se) in run.targets.items()]
        return np.array(out)


# -- fitting ------------------------------------------------------------------------------------------------
@dataclass
class Fit:
    values: dict[str, float]          # the fitted parameters (the others stay as the device has them)
    fitted: list[str]
    sigma: dict[str, float]           # 1-sigma uncertainty of the fitted ones
    correlation: np.ndarray           # between the fitted ones
    chi2_per_dof: float
    left_alone: list[str]


def fit(replays: Replays, runs: list[MeasuredRun], start: dict[str, float], names: list[str],
        max_iterations: int = 12, reach: float = 1.0, restarts: int = 3) -> Fit:
    """Fit `names`, from `start` (every parameter's value on the device; the ones not fitted are not set, so
    the device keeps them, its measured collectives included): a parameter that no probe over its range
    moves is left alone;
    a Nelder-Mead simplex finds the minimum, restarted from its best point while that helps (a replay's
    statistics are not smooth in its parameters -- a request joins one step or the next -- so no derivative
    steers the search and a simplex can stall), and central differences
    over +-20 % (a slope through that roughness) give the covariance. `reach` scales the probes and the
    first simplex, `restarts` bounds the simplex's restarts (a refit from a nearby optimum needs less)."""
    params = [PARAMETERS[n] for n in names]
    def at(u: np.ndarray) -> dict[str, float]:
        return {p.name: p.from_u(x) for p, x in zip(params, u)}

    def cost(u: np.ndarray) -> tuple[float, np.ndarray]:
        r = replays.residuals(runs, at(u))
        return float(r @ r), r

    u = np.array([p.to_u(start[p.name]) for p in params])
    best, r = cost(u)
    reach = np.array([_REACH[p.log] * reach for p in params])
    moved = []
    for j in range(len(params)):
        probes = [cost(u + np.eye(len(u))[j] * sign * reach[j])[1] for sign in (-1.0, 1.0)]
        moved.append(max(np.max(np.abs(probe - r)) for probe in probes))
    keep = [j for j, size in enumerate(moved) if size >= UNCONSTRAINED]
    left_alone = [params[j].name for j in range(len(params)) if j not in keep]
    params, u, reach = [params[j] for j in keep], u[keep], reach[keep]
    for _ in range(restarts if params else 0):  # restarted from its best point: a simplex can stall on a rough surface
        u, found, r = _nelder_mead(cost, u, best, r, reach, params, max_iterations)  # (never worse: it holds u)
        if found >= best:
            break
        best = found
    dof = max(len(r) - len(params), 1)
    chi2 = best / dof
    if params:
        jac = _jacobian(cost, u, r, params)
        cov = np.linalg.pinv(jac.T @ jac) * max(1.0, chi2)
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        corr = cov / np.maximum(np.outer(sd, sd), 1e-300)
    else:
        sd, corr = np.zeros(0), np.zeros((0, 0))
    fitted_values = {k: float(v) for k, v in at(u).items()}
    sigma = {p.name: float(fitted_values[p.name] * s if p.log else s * (p.upper - p.lower)) for p, s in zip(params, sd)}
    return Fit(fitted_values, [p.name for p in params], sigma, corr, chi2, left_alone)


def _nelder_mead(cost, u: np.ndarray, best: float, r: np.ndarray, reach: np.ndarray, params: list[Parameter],
                 iterations: int) -> tuple[np.ndarray, float, np.ndarray]:
    """Minimise `cost` from `u` (a simplex of steps `reach` along each parameter), inside the bounds."""
    def clip(x: np.ndarray) -> np.ndarray:
        return np.array([p.to_u(p.from_u(v)) for p, v in zip(params, x)])

    def evaluate(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        x = clip(x)
        c, res = cost(x)
        return c, x, res

    simplex = [(best, u, r)] + [evaluate(u + np.eye(len(u))[j] * reach[j]) for j in range(len(u))]
    for _ in range(iterations * (len(u) + 1)):
        simplex.sort(key=lambda e: e[0])
        if max(np.max(np.abs(x - simplex[0][1]) / reach) for _, x, _ in simplex[1:]) < 0.04:
            break
        centroid = np.mean([x for _, x, _ in simplex[:-1]], axis=0)
        worst = simplex[-1]
        reflected = evaluate(centroid + (centroid - worst[1]))
        if reflected[0] < simplex[0][0]:
            expanded = evaluate(centroid + 2.0 * (centroid - worst[1]))
            simplex[-1] = expanded if expanded[0] < reflected[0] else reflected
        elif reflected[0] < simplex[-2][0]:
            simplex[-1] = reflected
        else:
            contracted = evaluate(centroid + 0.5 * (worst[1] - centroid))
            if contracted[0] < worst[0]:
                simplex[-1] = contracted
            else:  # shrink towards the best
                best_x = simplex[0][1]
                simplex = [simplex[0]] + [evaluate(best_x + 0.5 * (x - best_x)) for _, x, _ in simplex[1:]]
    c, x, res = min(simplex, key=lambda e: e[0])
    return x, c, res


def _jacobian(cost, u: np.ndarray, r: np.ndarray, params: list[Parameter]) -> np.ndarray:
    """d residuals / d u by central differences of `_U_STEP` (one-sided at a bound)."""
    columns = []
    for j, p in enumerate(params):
        h = _U_STEP[p.log]
        up, down = u.copy(), u.copy()
        up[j] += h
        down[j] -= h
        if p.from_u(up[j]) == p.from_u(u[j]):  # at the upper bound
            columns.append((r - cost(down)[1]) / h)
        elif p.from_u(down[j]) == p.from_u(u[j]):  # at the lower bound
            columns.append((cost(up)[1] - r) / h)
        else:
            columns.append((cost(up)[1] - cost(down)[1]) / (2.0 * h))
    return np.column_stack(columns)


# -- the command ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="a vLLM run folder (vllm/meta.json + vllm/requests.jsonl), a loadgen output folder, a "
                             "/metrics exposition (AFTER or BEFORE,AFTER) or vLLM's log of the run")
    parser.add_argument("--trace", type=Path, default=None,
                        help="the trace the runs served (needed for metrics and logs)")
    parser.add_argument("--trace-dir", type=Path, action="append", default=[],
                        help="where to look for a run's dataset by name (besides the run folder)")
    parser.add_argument("--model", default=None, help="the model, where a run does not record it")
    parser.add_argument("--hardware", default=None, help="the device, where a run does not record it")
    parser.add_argument("--fit", default=",".join(PARAMETERS),
                        help=f"parameters to fit, comma-separated (default: all that the runs constrain, but "
                             f"decode_skew where the model's profile measured it: {', '.join(PARAMETERS)})")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="the overlay to write (default: <hardware>-calibrated.yaml)")
    parser.add_argument("--windows", type=int, default=3,
                        help="windows of consecutive requests each run's statistics are taken over (default 3)")
    parser.add_argument("--max-iterations", type=int, default=12)
    add_engine_args(parser)


def _error(ours: float, real: float) -> str:
    return f"{100.0 * (ours - real) / real:+.1f} %"


def main(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.fit.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARAMETERS]
    if unknown:
        print(f"error: unknown parameter(s) {', '.join(unknown)}; choose from {', '.join(PARAMETERS)}",
              file=sys.stderr)
        return 2
    given, default = asdict(engine_args_from(args)), asdict(EngineArgs())
    flags = {k: v for k, v in given.items() if v != default[k]}  # what the command line sets
    try:
        runs = [read_run(p, args.trace, (*args.trace_dir, *DEFAULT_TRACE_DIRS), args.model, args.hardware, flags)
                for p in args.runs]
        devices = {load_device(r.hardware).name for r in runs}
        if len(devices) > 1:
            raise RunError(f"the runs are of {', '.join(sorted(devices))}; calibrate one device at a time")
        base = load_device(runs[0].hardware)
        output = args.output or Path(f"{base.name}-calibrated.yaml")
        problem = output_file_problem(output)
        if problem:  # before the fit's replays: the overlay must have a home
            raise RunError(problem)
        replays = Replays(base)
        skew, measured = replays.skew(runs[0])
        start = current_values(base, skew)
        if measured and args.fit == ",".join(PARAMETERS):  # measured for this model: not refitted unless asked
            names.remove("decode_skew")
            print(f"decode_skew {skew:g} was measured for {runs[0].model} on {base.name}; not refitted "
                  f"(--fit decode_skew,... to)", file=sys.stderr)
        for run in runs:
            for note in run.notes:
                print(f"{run.name}: {note}", file=sys.stderr)
        before = {run.name: replays.statistics(run, {}) for run in runs}  # the device as it is
        result = fit(replays, _windows(runs, args.windows), start, names, args.max_iterations)
    except (RunError, UnknownHardwareError, UnknownModelError, NoProfileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{base.name}: {len(runs)} run(s), {sum(len(w.targets) for w in _windows(runs, args.windows))} statistics, "
          f"{replays.count} replays; chi2/dof {result.chi2_per_dof:.2f}")
    for name in result.fitted:
        p = PARAMETERS[name]
        print(f"  {name:<17} {p.show(start[name])} -> {p.show(result.values[name], result.sigma[name])}")
    for name in result.left_alone:
        print(f"  {name:<17} {PARAMETERS[name].show(start[name])} (not constrained by these runs; left alone)")
    if len(result.fitted) > 1:
        pairs = [f"{a}/{b} {result.correlation[i, j]:+.2f}" for i, a in enumerate(result.fitted)
                 for j, b in enumerate(result.fitted) if j > i]
        print(f"  correlations: {', '.join(pairs)}")
    print(f"\n{'run':<60} {'statistic':<12} {'vLLM':>10} {'before':>18} {'after':>18}")
    rows = []
    for run in runs:
        after = replays.statistics(run, result.values)
        for stat, (real, _) in run.targets.items():
            print(f"{run.name[-60:]:<60} {stat:<12} {real:>10.4g} {before[run.name][stat]:>10.4g} "
                  f"({_error(before[run.name][stat], real):>7}) {after[stat]:>10.4g} ({_error(after[stat], real):>7})")
            rows.append({"run": run.name, "statistic": stat, "vllm": float(real),
                         "before": float(before[run.name][stat]), "after": float(after[stat])})
    if not result.fitted:  # an overlay would only restate the device: say so, leave the output alone
        print(f"\nnothing fitted: these runs constrain none of {', '.join(names) or 'the parameters asked for'}; "
              f"no overlay written ({output} not created)", file=sys.stderr)
        return 1
    held_out = _held_out(replays, runs, start, result, args)
    record = {"runs": [r.name for r in runs], "statistics": rows, "held_out": held_out,
              "chi2_per_dof": round(result.chi2_per_dof, 3),
              "parameters": {n: {"value": result.values[n], "sigma": result.sigma[n],
                                 "bounds": [PARAMETERS[n].lower, PARAMETERS[n].upper]} for n in result.fitted},
              "correlation": {f"{a}/{b}": round(float(result.correlation[i, j]), 3)
                              for i, a in enumerate(result.fitted) for j, b in enumerate(result.fitted) if j > i},
              "not_constrained": result.left_alone}
    document = {**overlay(base.name, {n: result.values[n] for n in result.fitted}), "calibration": record}
    header = (f"# {base.name} refined by `vllm-emulator calibrate` from {len(runs)} run(s); the fitted values, their\n"
              f"# 1-sigma uncertainty and the errors before and after are under `calibration`.\n")
    output.write_text(header + yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    print(f"\nwrote {output}")
    return 0


def _windows(runs: list[MeasuredRun], k: int) -> list[MeasuredRun]:
    """What the fit sees: each run's windows of requests (a run without per-request data as a whole)."""
    return [w for run in runs for w in (run.windows(k) if k > 1 else []) or [run]]


def _held_out(replays: Replays, runs: list[MeasuredRun], start: dict[str, float], result: Fit,
              args: argparse.Namespace) -> list[dict]:
    """Each run (or, with one, each window of its requests) fitted without and scored."""
    if not result.fitted:
        return []
    windows = _windows(runs, args.windows)
    if len(runs) > 1:
        folds = [(_windows([r for j, r in enumerate(runs) if j != i], args.windows), [run])
                 for i, run in enumerate(runs)]
    else:
        folds = [([o for o in windows if o.name != w.name], [w]) for w in windows]
    out = []
    print(f"\nheld out ({'one run' if len(runs) > 1 else 'one window of requests'} at a time; fitted on the rest):")
    for training, testing in folds:
        if not training:
            continue
        fold = fit(replays, training, {**start, **result.values}, result.fitted, args.max_iterations, reach=0.25,
                   restarts=1)
        for run in testing:
            ours = replays.statistics(run, fold.values)
            errors = {stat: float(100.0 * (ours[stat] - real) / real) for stat, (real, _) in run.targets.items()}
            out.append({"held_out": run.name, "errors_pct": {k: round(v, 2) for k, v in errors.items()},
                        "values": {n: fold.values[n] for n in fold.fitted}})
            means = ", ".join(f"{k} {v:+.1f} %" for k, v in errors.items() if k.endswith("mean"))
            print(f"  {run.name[-70:]}: {means}")
    return out
