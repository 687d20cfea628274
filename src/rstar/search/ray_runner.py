"""`rstar generate --ray` / `rstar eval --ray`: searches sharded over Ray actors (docs/RAY.md).

The paper searches 747k problems per round; one machine does not get there. Here the driver
(the process that runs `rstar generate`) keeps a queue of searches and a pool of Ray actors.
Each actor holds its own backends (sandbox pool and grader processes, the policy from
`cfg.model`, the reward model) and runs the ordinary scheduler (`run_jobs`) over the searches
it is fed, so batching across problems works inside every actor exactly as on one machine.

Why the design is what it is:

- **The driver owns the tree file.** Actors return finished records (the same dicts
  `rstar.search.jobs.record` builds on one machine) and the driver appends them with
  `TreeFileWriter`, so the output is byte-for-byte the single-machine format and extraction
  and training do not care how it was produced. The driver keeps the set of keys written:
  a key is never written twice, even when an actor dies after finishing a search but before
  reporting it (that search is simply redone and the late copy, if any, dropped).
- **Pull model, small units.** Each actor holds at most `max_inflight + prefetch` searches
  (running or queued inside it); the driver tops it up as searches finish. A dead actor
  loses only those, a slow actor takes less, and no static shard holds the run back. The
  actor's scheduler never drains between chunks: it pulls the next job the moment a search
  finishes, so its batches stay as full as on one machine.
- **One call in flight per actor.** `exchange(new_jobs)` queues jobs and returns the records
  finished since the last call as soon as there is one (or after `exchange_wait_s`). The
  driver `ray.wait`s on these calls; a call that raises `RayActorError` (killed, out of
  memory, node lost) marks the actor dead: its unwritten searches go back to the front of the
  queue and a replacement actor is started (at most `max_replacements` in a run).
- **Resumable.** Every line is fsynced as it is written, so the driver itself can be killed
  and the run resumed with `--resume` like a single-machine run (its actors die with it:
  Ray ends actors whose owner is gone).

Ray is an install extra (`pip install rstar[ray]`): nothing here imports it until a Ray run
starts, and nothing else in the project imports this module's Ray parts.

Why one file of this length: the driver, its actors and its resume logic share one job
queue and one record format, and split apart they would have to pass both back and forth.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rstar import RstarError
from rstar.config import Config
from rstar.lock import writes_to
from rstar.search.scheduler import Job, Stats

# How long an actor holds an `exchange` call open when nothing has finished yet. Short enough
# that the driver sees a live actor (and its pid) soon after it starts; a finished search ends
# the call at once, so this does not delay results.
EXCHANGE_WAIT_S = 2.0
# How long the driver waits before telling the user that no actor could be placed (the
# cluster lacks the resources asked for, or an autoscaler has not added them yet).
PLACEMENT_WARN_S = 120.0


@dataclass
class RayOptions:
    """How a run uses Ray. `address`: `local` starts a Ray instance in this process (gone when
    the run ends); `auto` joins the cluster this machine belongs to (`ray start`, or
    `RAY_ADDRESS`); `HOST:PORT` joins the cluster whose head is there; `ray://HOST:10001`
    connects through Ray Client (needs `ray[client]`). If this process is already connected
    to Ray (`ray.init` was called), that connection is used whatever `address` says."""

    address: str = "local"
    actors: int | None = None  # default: as many as the cluster's GPUs (or CPUs) allow
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs and the model is local
    cpus_per_actor: float = 1.0  # also Ray's OMP_NUM_THREADS for the actor's torch
    max_replacements: int | None = None  # actors started for dead ones; default: one per actor
    prefetch: int | None = None  # jobs queued in an actor beyond max_inflight; default max_inflight
    exchange_wait_s: float = EXCHANGE_WAIT_S


@dataclass
class RayStats(Stats):
    """`Stats` of a Ray run: the counts are the driver's (what it wrote, exactly once); model
    calls and model time are summed over the actors, lost work included."""

    actors: int = 0  # actors asked for at the start
    deaths: int = 0  # actors lost during the run
    replacements: int = 0  # actors started to replace them
    requeued: int = 0  # searches handed out again after their actor died
    duplicates: int = 0  # records dropped because their key was already written

    def as_dict(self) -> dict:
        d = super().as_dict()
        wall = self.wall_s
        d.update(
            searches_per_s=round(self.done / wall, 3) if wall else 0.0,
            actors=self.actors,
            deaths=self.deaths,
            replacements=self.replacements,
            requeued=self.requeued,
            duplicates=self.duplicates,
        )
        return d


@dataclass
class ActorState:
    """The driver's view of one actor (what `monitor` callbacks see)."""

    index: int
    handle: Any
    started: float
    ready: bool = False  # answered its first call: backends built, model loaded
    alive: bool = True
    pid: int | None = None
    node: str = ""
    done: int = 0  # records of this actor the driver wrote
    outstanding: dict[str, Job] = field(default_factory=dict)  # handed out, not reported
    closed: bool = False  # told that no more jobs are coming for now
    ref: Any = None  # the call in flight (ready() or exchange())
    model_calls: int = 0
    model_s: float = 0.0
    error: str = ""  # why it died


@dataclass
class RayProgress:
    """A snapshot passed to `monitor` after every batch of results."""

    done: int
    failed: int
    total: int
    elapsed_s: float
    actors: list[ActorState]
    deaths: int
    replacements: int

    @property
    def alive(self) -> int:
        return sum(a.alive for a in self.actors)

    @property
    def ready(self) -> int:
        return sum(a.alive and a.ready for a in self.actors)


# --- the actor -----------------------------------------------------------------------------------

_CLOSE = object()  # fed to the actor's scheduler: no more jobs for now


class SearchWorker:
    """One Ray actor: its own backends and a scheduler loop over the jobs it is fed.

    The scheduler (`run_jobs`) runs in a thread for as long as the actor has work, pulling
    jobs from a queue that `exchange` fills; its results wait in a list that `exchange`
    empties. So the driver never waits on a whole chunk, and the actor never drains its
    batches between chunks. When the driver says no more jobs are coming (`close`), the
    scheduler finishes what it holds and the thread waits for the next job.
    """

    def __init__(
        self,
        cfg: Config,
        policy_factory: Callable[[], Any] | None = None,
        reward_factory: Callable[[], Any] | None = None,
    ):
        from rstar.search.jobs import open_backends
        from rstar.search.treefile import versions

        self.cfg = cfg
        self.vers = versions()
        self._stack = contextlib.ExitStack()
        # The sandbox and grader start fresh interpreters (subprocess, not fork), so building
        # the policy first does not leak its memory into them.
        policy = policy_factory() if policy_factory is not None else None
        reward = reward_factory() if reward_factory is not None else None
        self.backends = self._stack.enter_context(open_backends(cfg, policy=policy, reward=reward))
        self._jobs: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._records: list[dict] = []
        self._errors: list[dict] = []
        self._fatal: str | None = None
        self._calls, self._model_s = 0, 0.0  # of finished scheduler sessions
        self._live: Stats | None = None  # the running session's
        self._thread = threading.Thread(target=self._serve, name="rstar-ray-scheduler", daemon=True)
        self._thread.start()

    def info(self) -> dict:
        import ray

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
        }

    def exchange(self, jobs: list[Job], close: bool, wait_s: float) -> dict:
        """Queue `jobs` (and, with `close`, the end of the feed); return what has finished,
        waiting up to `wait_s` for the first result."""
        for job in jobs:
            self._jobs.put(job)
        if close:
            self._jobs.put(_CLOSE)
        with self._cond:
            self._cond.wait_for(lambda: self._records or self._errors or self._fatal, timeout=wait_s)
            records, errors = self._records, self._errors
            self._records, self._errors = [], []
        live = self._live
        return {
            "records": records,
            "errors": errors,
            "fatal": self._fatal,
            "model_calls": self._calls + (live.model_calls if live else 0),
            "model_s": self._model_s + (live.model_s if live else 0.0),
        }

    def close(self) -> None:
        self._stack.close()

    # -- in the scheduler thread --

    def _serve(self) -> None:
        from rstar.search.jobs import record
        from rstar.search.scheduler import run_jobs

        def on_done(job: Job, tree: Any, info: dict) -> None:
            rec = record(job, tree, info, self.cfg, self.vers)
            with self._cond:
                self._records.append(rec)
                self._cond.notify_all()

        def on_error(job: Job, tb: str) -> None:
            err = {"key": job.key, "problem_id": job.problem.id, "error": tb, "time": time.time()}
            with self._cond:
                self._errors.append(err)
                self._cond.notify_all()

        def progress(stats: Stats) -> None:
            self._live = stats

        while True:
            first = self._jobs.get()
            if first is _CLOSE:
                continue
            try:
                stats = run_jobs(self._feed(first), self.cfg, self.backends, on_done, on_error, progress)
            except BaseException:  # a backend failed (CUDA error, dead server): the actor is unusable
                with self._cond:
                    self._fatal = traceback.format_exc()
                    self._cond.notify_all()
                return
            self._calls += stats.model_calls
            self._model_s += stats.model_s
            self._live = None

    def _feed(self, first: Job) -> Iterator[Job]:
        # Blocks only when every job handed to this actor has started and the driver has not
        # sent more or closed the feed yet: the driver keeps `prefetch` jobs queued here, so
        # in practice only for the round trip after a burst of finished searches.
        yield first
        while True:
            job = self._jobs.get()
            if job is _CLOSE:
                return
            yield job


# --- the driver ----------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Connect to Ray for the length of the block (start a local instance for `local`),
    unless this process is connected already; then leave that connection as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=options.address)
    except ConnectionError:
        # (Ray's own message names an `--address` flag, which rstar does not have.)
        raise RstarError(
            f"--ray {options.address}: found no running Ray cluster to join: start one with `ray start "
            "--head`, pass its HOST:PORT, or give --ray no value to start Ray on this machine"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _portable(cfg: Config) -> Config:
    """Model paths made absolute when they exist here: actors run in other working directories
    (and, on other nodes, see the same paths only on a shared file system)."""
    model = cfg.model
    changes = {}
    for name in ("policy", "ppm"):
        value = getattr(model, name)
        if value and "://" not in value and Path(value).exists():
            changes[name] = str(Path(value).resolve())
    return dataclasses.replace(cfg, model=dataclasses.replace(model, **changes)) if changes else cfg


def actor_resources(options: RayOptions, cfg: Config, resources: dict) -> tuple[int, float, float]:
    """(actors, gpus per actor, cpus per actor) for a cluster with these total `resources`.
    GPUs go to actors only when the model runs in the actor: not behind an HTTP server
    (`openai` backend), not when the config pins it to the CPU."""
    cpus = options.cpus_per_actor
    gpus = options.gpus_per_actor
    if gpus is None:
        local_model = cfg.model.backend != "openai" and cfg.model.device != "cpu"
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and local_model else 0.0
    if options.actors:
        n = options.actors
    elif gpus > 0:
        n = int(resources.get("GPU", 0) // gpus)
    else:
        n = int(resources.get("CPU", 1) // cpus) if cpus > 0 else 1
    return max(1, n), gpus, cpus


class _Driver:
    def __init__(
        self,
        jobs: list[Job],
        cfg: Config,
        options: RayOptions,
        writer: Any,
        errors: Any,
        written: set[str],
        policy_factory: Callable[[], Any] | None,
        reward_factory: Callable[[], Any] | None,
        report: Callable[[RayProgress], None],
    ):
        import ray

        self.ray = ray
        self.cfg, self.options = cfg, options
        self.writer, self.errors = writer, errors
        self.written = written
        self.factories = (policy_factory, reward_factory)
        self.report = report
        self.pending: deque[Job] = deque(jobs)
        self.total = len(jobs)
        self.slots: list[ActorState] = []
        self.stats = RayStats()
        n, self.gpus, self.cpus = actor_resources(options, cfg, ray.cluster_resources())
        n = min(n, len(jobs))
        self.stats.actors = n
        self.max_replacements = options.max_replacements if options.max_replacements is not None else n
        prefetch = options.prefetch if options.prefetch is not None else cfg.scheduler.max_inflight
        self.capacity = cfg.scheduler.max_inflight + prefetch
        self.worker_cls = ray.remote(SearchWorker).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_task_retries=0
        )
        self.last_error = ""
        for _ in range(n):
            self._start_actor()

    # -- actors --

    def _start_actor(self) -> None:
        handle = self.worker_cls.remote(self.cfg, *self.factories)
        slot = ActorState(index=len(self.slots), handle=handle, started=time.monotonic())
        slot.ref = handle.info.remote()  # answered once the constructor has built the backends
        self.slots.append(slot)

    def _lost(self, slot: ActorState, why: str) -> None:
        """An actor died: hand its unwritten searches out again and start a replacement."""
        slot.alive, slot.ref, slot.error = False, None, why
        self.stats.deaths += 1
        self.last_error = why
        back = [job for key, job in slot.outstanding.items() if key not in self.written]
        slot.outstanding.clear()
        self.pending.extendleft(reversed(back))  # front of the queue: they were started first
        self.stats.requeued += len(back)
        where = f"pid {slot.pid} on {slot.node}" if slot.pid else "before it was ready"
        last_line = why.strip().splitlines()[-1] if why.strip() else "no reason given"  # what happened
        print(
            f"rstar: Ray actor {slot.index} ({where}) died: {last_line}; "
            f"{len(back)} searches handed out again",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(Exception):
            self.ray.kill(slot.handle, no_restart=True)
        if self.pending and self.stats.replacements < self.max_replacements:
            self.stats.replacements += 1
            self._start_actor()

    def _send(self, slot: ActorState) -> None:
        """Top the actor up to `capacity` searches and start the next exchange with it. While
        work is scarce, each actor takes only its share of what is left."""
        alive = sum(s.alive for s in self.slots)
        room = self.capacity - len(slot.outstanding)
        share = math.ceil(len(self.pending) / max(1, alive))
        new: list[Job] = []
        while self.pending and len(new) < min(room, share):
            job = self.pending.popleft()
            if job.key in self.written:
                continue
            new.append(job)
            slot.outstanding[job.key] = job
        if new:
            slot.closed = False
        close = not self.pending and not slot.closed
        slot.closed = slot.closed or close
        slot.ref = slot.handle.exchange.remote(new, close, self.options.exchange_wait_s)

    # -- results --

    def _take(self, slot: ActorState, reply: dict) -> None:
        for rec in reply["records"]:
            key = rec["key"]
            slot.outstanding.pop(key, None)
            if key in self.written:
                self.stats.duplicates += 1
                continue
            self.writer.write(rec)
            self.written.add(key)
            slot.done += 1
            self.stats.done += 1
            self.stats.solved += bool(rec.get("correct"))
            self.stats.nodes += rec["stats"]["nodes"]
            self.stats.tokens += rec["stats"]["tokens"]
        for err in reply["errors"]:
            slot.outstanding.pop(err["key"], None)
            if err["key"] in self.written:
                continue
            self.errors.write({**err, "actor": slot.index, "node": slot.node})
            self.stats.failed += 1
            print(f"search {err['key']} failed (Ray actor {slot.index}):\n{err['error']}", file=sys.stderr)
        slot.model_calls, slot.model_s = reply["model_calls"], reply["model_s"]
        self.stats.model_calls = sum(s.model_calls for s in self.slots)
        self.stats.model_s = sum(s.model_s for s in self.slots)
        if reply["fatal"]:
            self._lost(slot, f"its scheduler failed:\n{reply['fatal']}")

    def _handle(self, slot: ActorState, ref: Any) -> None:
        from ray.exceptions import RayActorError, RayError

        slot.ref = None
        try:
            reply = self.ray.get(ref)
        except RayActorError as e:  # killed, out of memory, node gone, constructor raised
            self._lost(slot, str(e))
            return
        except RayError as e:  # anything else Ray could not deliver: treat the actor as lost
            self._lost(slot, f"{type(e).__name__}: {e}")
            return
        if not slot.ready:
            slot.ready = True
            slot.pid, slot.node = reply["pid"], reply["host"]
            return
        self._take(slot, reply)

    def _snapshot(self) -> RayProgress:
        return RayProgress(
            done=self.stats.done,
            failed=self.stats.failed,
            total=self.total,
            elapsed_s=self.stats.wall_s,
            actors=list(self.slots),
            deaths=self.stats.deaths,
            replacements=self.stats.replacements,
        )

    def run(self) -> RayStats:
        warned = False
        t0 = time.monotonic()
        while True:
            for slot in self.slots:
                if slot.alive and slot.ready and slot.ref is None and (self.pending or slot.outstanding):
                    self._send(slot)
            if not self.pending and not any(s.outstanding for s in self.slots if s.alive):
                break
            inflight = {s.ref: s for s in self.slots if s.alive and s.ref is not None}
            if not inflight:
                raise RstarError(
                    f"every Ray actor died ({self.stats.deaths} lost, {self.stats.replacements} replaced, "
                    f"the limit); {len(self.pending)} searches left. Finished searches are in the tree "
                    f"file: rerun with --resume. Last error:\n{self.last_error}"
                )
            refs = list(inflight)
            ready, rest = self.ray.wait(refs, num_returns=1, timeout=1.0)
            if ready and rest:  # take everything that is ready now, not one per turn
                more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                self._handle(inflight[ref], ref)
            if (
                not warned
                and not any(s.ready for s in self.slots)
                and time.monotonic() - t0 > PLACEMENT_WARN_S
            ):
                warned = True
                print(
                    f"rstar: no Ray actor has started after {PLACEMENT_WARN_S:.0f}s; each asks for "
                    f"{self.cpus} CPU and {self.gpus} GPU; the cluster has {self.ray.cluster_resources()}",
                    file=sys.stderr,
                    flush=True,
                )
            self.report(self._snapshot())
        self.report(self._snapshot())
        return self.stats

    def shutdown(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(Exception):
                self.ray.kill(slot.handle, no_restart=True)


@writes_to("out_dir")
def generate_ray(
    problems: list,
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    options: RayOptions | None = None,
    *,
    policy_factory: Callable[[], Any] | None = None,
    reward_factory: Callable[[], Any] | None = None,
    show_progress: bool = True,
    description: str = "generate",
    monitor: Callable[[RayProgress], None] | None = None,
) -> RayStats:
    """`rstar.search.run.generate` over Ray actors: the same OUT/trees.jsonl, errors.jsonl and
    run.json, resumable the same way.

    Actors build the policy and reward model from `cfg.model` (paths must exist on every node,
    or be hub names / server URLs), or by calling `policy_factory()` / `reward_factory()`
    inside the actor: picklable callables, such as a class or a module-level function that
    every Ray worker can import. `monitor` is called with a `RayProgress` after every batch of
    results (tests use it to kill an actor mid-run).
    """
    from rstar.progress import Reporter
    from rstar.search.expand import needs_reward
    from rstar.search.jobs import check_reward, prepare_run
    from rstar.search.treefile import TreeFileWriter, open_for_resume

    options = options or RayOptions()
    if policy_factory is None and not cfg.model.policy:
        raise RstarError(
            "no policy given: pass --policy MODEL (an HF directory or hub name) or set model.policy"
        )
    if needs_reward(cfg.search) and not cfg.model.ppm and reward_factory is None:
        check_reward(cfg, None)
    out, jobs, _ = prepare_run(problems, cfg, out_dir, resume, extra={"ray": dataclasses.asdict(options)})
    stats = RayStats()
    if not jobs:
        return stats
    trees_path = out / "trees.jsonl"
    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_session(options))
        writer = stack.enter_context(TreeFileWriter(trees_path))
        errors = stack.enter_context(TreeFileWriter(out / "errors.jsonl", fsync=False))
        reporter = stack.enter_context(Reporter(len(jobs), description, enabled=show_progress))

        def report(p: RayProgress) -> None:
            wall = p.elapsed_s
            rate = p.done / wall if wall else 0.0
            tokens = driver.stats.tokens / wall if wall else 0.0
            solved = driver.stats.solved / p.done if p.done else 0.0
            lost = f", {p.deaths} lost" if p.deaths else ""
            reporter.update(
                p.done + p.failed,
                f"actors {p.ready} up/{p.alive - p.ready} starting{lost} | {rate:.2f} searches/s | "
                f"{tokens:.0f} tok/s | solved {solved:.0%}",
            )
            if monitor is not None:
                monitor(p)

        driver = _Driver(
            jobs,
            _portable(cfg),
            options,
            writer,
            errors,
            open_for_resume(trees_path),
            policy_factory,
            reward_factory,
            report,
        )
        try:
            return driver.run()
        finally:
            driver.shutdown()


# --- command line ----------------------------------------------------------------------------------


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The --ray flags shared by `rstar generate` and `rstar eval`."""
    group = parser.add_argument_group("Ray (docs/RAY.md)")
    group.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the searches on Ray actors: no value starts Ray on this machine; 'auto' joins the "
        "cluster this machine is in; HOST:PORT or ray://HOST:10001 joins that cluster",
    )
    group.add_argument(
        "--ray-actors",
        type=int,
        metavar="N",
        help="actors to start (default: one per GPU, or per CPU without GPUs)",
    )
    group.add_argument(
        "--ray-gpus-per-actor",
        type=float,
        metavar="X",
        help="GPUs per actor (default: 1 when the cluster has GPUs and the model runs in the actor)",
    )
    group.add_argument(
        "--ray-cpus-per-actor", type=float, default=1.0, metavar="X", help="CPUs per actor (default: 1)"
    )
    group.add_argument(
        "--ray-max-replacements",
        type=int,
        metavar="N",
        help="actors started to replace dead ones before the run gives up (default: one per actor)",
    )


def ray_options_from_args(args: argparse.Namespace) -> RayOptions | None:
    if getattr(args, "ray", None) is None:
        return None
    return RayOptions(
        address=args.ray,
        actors=args.ray_actors,
        gpus_per_actor=args.ray_gpus_per_actor,
        cpus_per_actor=args.ray_cpus_per_actor,
        max_replacements=args.ray_max_replacements,
    )
