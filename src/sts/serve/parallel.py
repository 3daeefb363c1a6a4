"""Tensor-parallel serving: rank 0 drives the engine and the other ranks repeat its calls (vLLM's driver and workers).

Under tensor parallelism every rank holds a part of the target (:mod:`sts.parallel`) and each
forward all-reduces across the ranks, so every rank must make the same engine calls in the same
order. The server's scheduler decides them on rank 0 alone (requests arrive there, at times no
other rank can predict). So rank 0 runs the one :class:`~sts.serve.scheduler.Scheduler` over an
:class:`EngineDriver`, which sends each call that changes the engine (a prefill chunk, a round, a
release, a reseed) to the other ranks before running it; they run :func:`follow`, a loop that
receives the calls and makes them on their own engines, until rank 0 sends ``stop``. A command
is a few small Python values (an op name, a slot, prompt ids, sampling settings), broadcast with
``torch.distributed.broadcast_object_list`` over a gloo group of its own: on the CPU even when the
model's all-reduces run on NCCL, so a command costs no GPU synchronisation.

Each rank's engine then computes the same tokens (the all-reduce leaves one sum everywhere and the
generators are seeded alike); only rank 0's are used. An error inside a call is met by every rank
alike (same code, same state): rank 0's scheduler fails the request, the other ranks drop the call.
"""

from __future__ import annotations

import logging
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch.distributed as dist

from sts.decoding import GenerationStats
from sts.engine import Engine
from sts.errors import STSError
from sts.parallel import Shard, Workers, check_split, device_type, rank_device, start_workers
from sts.sampling import SamplingConfig

log = logging.getLogger(__name__)

#: How long a rank waits for rank 0's next command: a server may be idle for days.
IDLE_TIMEOUT = timedelta(days=365)

#: Engine methods a driver may call without telling the other ranks (they change nothing).
_READS = frozenset({"free_slots", "room", "slot_settings"})


class Channel:
    """Commands from rank 0 to the other ranks: a gloo group of all ranks, made collectively (every rank, same order)."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def send(self, command: tuple[Any, ...]) -> None:
        """Send ``command`` (picklable values) from rank 0 to every other rank."""
        dist.broadcast_object_list([command], src=0, group=self.group)

    def receive(self) -> tuple[Any, ...]:
        """Return rank 0's next command (waits for it)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class _MirroredPrefill:
    """Rank 0's :meth:`Engine.prefill_steps` iterator: each chunk, and closing it, is sent to the other ranks first."""

    def __init__(self, driver: EngineDriver, slot: int, local: Iterator[int | None]) -> None:
        self.driver, self.slot, self.local = driver, slot, local

    def __iter__(self) -> _MirroredPrefill:
        return self

    def __next__(self) -> int | None:
        self.driver.send("next", self.slot)
        return next(self.local)

    def close(self) -> None:
        """Stop the prefill here and on the other ranks."""
        self.driver.send("close", self.slot)
        self.local.close()  # type: ignore[attr-defined]


class _MirroredGenerator:
    """The engine's random generator as the scheduler sees it: reseeding it reseeds every rank's."""

    def __init__(self, driver: EngineDriver) -> None:
        self.driver = driver

    def manual_seed(self, seed: int) -> None:
        self.driver.send("seed", seed)
        self.driver.engine.generator.manual_seed(seed)


class EngineDriver:
    """Rank 0's view of its :class:`~sts.engine.Engine` under tensor parallelism: what the scheduler calls, mirrored.

    ``prefill_steps``, ``step``, ``release`` and ``generator.manual_seed`` are sent to the other
    ranks (see the module docstring) before they run here; ``free_slots``, ``room``, ``stats`` and
    the engine's attributes are read here. Any other engine method raises STSError: run here
    alone, its forwards would wait for the other ranks forever. Every call first checks that the
    other ranks are alive (STSError naming the one that has exited).
    """

    def __init__(self, engine: Engine, channel: Channel, workers: Workers) -> None:
        self.engine, self.channel, self.workers = engine, channel, workers
        self.generator = _MirroredGenerator(self)

    def send(self, *command: Any) -> None:
        """Send ``command`` to the other ranks; raise STSError when one of them has exited."""
        self.workers.check()
        self.channel.send(command)

    @property
    def stats(self) -> GenerationStats:
        return self.engine.stats

    @stats.setter
    def stats(self, value: GenerationStats) -> None:
        self.engine.stats = value

    def prefill_steps(
        self, slot: int, prompt: Sequence[int], sampling: SamplingConfig | None = None,
        copy_from: int | None = None, cached: bool = False, budget: float | None = None,
    ) -> _MirroredPrefill:
        """Return :meth:`Engine.prefill_steps`' iterator, every rank prefilling the same chunks (and slot budget)."""
        args = (slot, list(prompt), sampling, copy_from, cached, budget)
        self.send("prefill_steps", *args)
        return _MirroredPrefill(self, slot, self.engine.prefill_steps(*args))

    def step(self) -> list[list[int]]:
        """Run :meth:`Engine.step` on every rank; return rank 0's tokens."""
        self.send("step")
        return self.engine.step()

    def release(self, slot: int) -> None:
        """Run :meth:`Engine.release` on every rank."""
        self.send("release", slot)
        self.engine.release(slot)

    def stop(self) -> None:
        """End the other ranks' :func:`follow` loops (the driver takes no more calls)."""
        self.send("stop")

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.engine, name)
        if callable(value) and name not in _READS:
            raise STSError(f"Engine.{name} is not run on the other tensor-parallel ranks: the scheduler's calls "
                           "(prefill_steps, step, release) are")
        return value


def follow(engine: Engine, channel: Channel) -> None:
    """Make rank 0's engine calls on this rank's ``engine``, in its order, until it sends ``stop``.

    A call that raises here raised on rank 0 too (same code, same state): it is dropped. Losing rank
    0 (its connection closes) raises from the receive.
    """
    prefills: dict[int, Iterator[int | None]] = {}

    def close(slot: int) -> None:
        steps = prefills.pop(slot, None)
        if steps is not None:
            steps.close()  # type: ignore[attr-defined]

    while True:
        op, *args = channel.receive()
        if op == "stop":
            return
        try:
            if op == "prefill_steps":
                close(args[0])
                prefills[args[0]] = engine.prefill_steps(*args)
            elif op == "next":
                next(prefills[args[0]])
            elif op == "close":
                close(args[0])
            elif op == "seed":
                engine.generator.manual_seed(*args)
            else:
                getattr(engine, op)(*args)  # step, release
        except Exception:  # noqa: BLE001  (rank 0 met the same error and answered its request with it)
            log.debug("tensor-parallel call %s failed here as on rank 0", op, exc_info=True)
        engine.stats = GenerationStats()  # nobody reads them here: keep memory flat


class TensorParallel:
    """This process's place in a tensor-parallel :class:`~sts.api.LLM`: its part of the target (``shard``), the command
    channel, and on rank 0 the other ranks' processes (``workers``).

    Made by :meth:`start` on rank 0 (``LLM(..., tensor_parallel=N)``), which spawns ranks ``1 .. N - 1``;
    each of those builds the same LLM with its own :class:`TensorParallel` (:func:`follow_llm`).
    """

    def __init__(self, shard: Shard, kind: str, workers: Workers | None = None) -> None:
        self.shard, self.kind, self.workers = shard, kind, workers
        self.channel = Channel()

    @classmethod
    def start(cls, world: int, device: str, target: Any, draft: Any, settings: dict[str, Any]) -> TensorParallel:
        """Return rank 0's place in a new ``world``-rank group; ranks ``1 .. world - 1`` build ``LLM(target, draft,
        **settings)`` in processes of their own. Raises STSError for loaded models (each rank loads its own part),
        a local target that does not split over ``world`` ranks (before any starts: :func:`sts.parallel.check_split`),
        or as :func:`sts.parallel.start_workers` does."""
        if not all(m is None or isinstance(m, (str, Path)) for m in (target, draft)):
            raise STSError("tensor_parallel loads each rank's part of the target itself: give checkpoint paths, "
                           "not loaded models")
        kind = device_type(device)
        check_split(target, world)
        sources = (str(target), None if draft is None else str(draft))
        workers = start_workers(world, kind, follow_llm, (*sources, settings, kind))
        try:
            return cls(Shard(0, world), kind, workers)
        except BaseException:
            workers.close(abort=True)
            raise

    @property
    def leads(self) -> bool:
        """Return whether this is rank 0 (it serves; the others follow)."""
        return self.shard.rank == 0

    @property
    def device(self) -> str:
        """Return this rank's device: its own GPU, or the CPU."""
        return rank_device(self.kind)

    def agree(self, value: Any) -> Any:
        """Return rank 0's ``value`` on every rank (a collective: every rank calls it at the same point)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.channel.group)
        return box[0]

    def drive(self, engine: Engine) -> Engine | EngineDriver:
        """Return the engine this rank's scheduler calls: on rank 0 a driver that the other ranks follow."""
        if not self.leads:
            return engine
        assert self.workers is not None
        return EngineDriver(engine, self.channel, self.workers)

    def close(self, abort: bool = False) -> None:
        """On rank 0, stop the other ranks (their :func:`follow` loops end) and wait for their processes; with ``abort``,
        or when one has failed, terminate them. Idempotent."""
        if self.workers is None or self.workers.closed:
            return
        if not abort:
            try:
                self.workers.check()
                self.channel.send(("stop",))
            except Exception:  # noqa: BLE001  (a rank has gone: nothing to stop gracefully)
                log.warning("tensor-parallel ranks could not be stopped cleanly: terminating them", exc_info=True)
                abort = True
        self.workers.close(abort=abort)


def follow_llm(rank: int, world: int, target: str, draft: str | None, settings: dict[str, Any], kind: str) -> None:
    """Rank ``rank`` of a tensor-parallel :class:`~sts.api.LLM`: build its part (``settings`` are the LLM's keyword
    arguments) and follow rank 0's engine calls until it stops them. Runs in a process spawned by :meth:`TensorParallel.start`."""
    from sts.api import LLM

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: rank 0 alone shuts down, then stops us
    place = TensorParallel(Shard(rank, world), kind)
    llm = LLM(target, draft, **settings, tensor_parallel=place)
    follow(llm.engine, place.channel)
