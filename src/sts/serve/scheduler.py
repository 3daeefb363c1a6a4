"""Continuous batching over the one engine: requests queue, join free slots between rounds and leave when they stop.

One :class:`Scheduler` owns an :class:`~sts.engine.Engine` (which is not thread-safe): every call
into the engine comes from :meth:`Scheduler.run_once`, driven either by the scheduler's own
thread (the server, :meth:`Scheduler.start`) or by the caller's thread (the Python API). Each
iteration

1. frees the slots of cancelled requests (a client that went away);
2. admits waiting requests into free slots (first come, first served);
3. prefills: one chunk at a time (``Engine.prefill_steps``), for at most ``prefill_slice_s``
   seconds while other requests decode, so a long prompt delays their next round by about one
   chunk, not by its whole prefill;
4. runs one decode round (``Engine.step``) for the decoding slots and hands each request its
   tokens; a request stops at an end-of-sequence id (kept in its ids, not in its text; unless it
   asked to ignore them), at ``max_tokens``, at a stop string (:class:`~sts.serve.text.TextStream`:
   its ids end with the token that completed it) or when its slot's cache is full, and its slot
   is released at once.

A request's output arrives as :class:`Delta` objects through the callable it was made with,
from the scheduler's thread. An exception inside the engine fails the requests it concerns
(a prefill: that request; a round: the requests of that round) with ``finish_reason ==
"error"`` and releases their slots; the scheduler goes on serving.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

from sts.decoding import GenerationStats
from sts.engine import Engine
from sts.errors import STSError
from sts.sampling import SamplingConfig
from sts.serve.text import TextStream

log = logging.getLogger(__name__)


class RequestError(STSError):
    """A request that cannot be served as asked (HTTP 4xx): the message, the parameter at fault and a short code."""

    status = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class QueueFull(RequestError):
    """Every slot is busy and the waiting queue is full (HTTP 429)."""

    status = 429


@dataclass(frozen=True)
class RequestParams:
    """How one request decodes: its token limit, sampling, stop strings, seed and budget."""

    max_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    stop: tuple[str, ...] = ()
    #: Reseeds the engine's generator as the request starts (see :class:`Scheduler`): best effort.
    seed: int | None = None
    #: Decode past end-of-sequence ids, up to ``max_tokens`` (benchmarks: every request decodes the same count).
    ignore_eos: bool = False
    #: This request's selection budget (rows, or a fraction of its context; :meth:`Engine.prefill`); None: the engine's.
    budget: float | None = None


@dataclass
class Delta:
    """What one iteration produced for a request: new text and ids, and at the end why it finished.

    ``finish_reason``: None while it runs, then "stop" (an end-of-sequence id or a stop string),
    "length" (``max_tokens`` or a full cache), "abort" (cancelled) or "error" (``error`` says why).
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class Request:
    """One prompt on its way through the scheduler: its parameters, where its output goes, and its progress."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: RequestParams, sink: Callable[[Delta], None], tokenizer: Any) -> None:
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.text = TextStream(tokenizer, params.stop)
        self.token_ids: list[int] = []
        #: Per-request accounting in :class:`~sts.decoding.GenerationStats` terms (phase times are the
        #: rounds' times, shared with the requests decoding beside it).
        self.stats = GenerationStats(prefill_tokens=1)
        self.slot: int | None = None
        self.steps: Iterator[int | None] | None = None
        self.cancelled = False
        self.finish_reason: str | None = None
        #: ``time.perf_counter()`` stamps: submitted, given a slot, first token, finished.
        self.arrived = time.perf_counter()
        self.admitted = self.first_token_at = self.finished_at = 0.0

    @property
    def time_to_first_token(self) -> float:
        """Return seconds from submission to the first token (0 before it)."""
        return self.first_token_at - self.arrived if self.first_token_at else 0.0


class Observer(Protocol):
    """Receives the scheduler's measurements (the server's Prometheus metrics implement it)."""

    def round(self, accepted: list[int], sparsity: float | None, dense: bool) -> None:
        """One decode round: tokens produced per decoding slot, the round's sparsity (None: a dense method), and
        whether a selection method verified it densely (the engine's cross-over: sparsity 0)."""

    def first_token(self, seconds: float) -> None:
        """A request's first token, ``seconds`` after it was submitted."""

    def finished(self, request: Request) -> None:
        """A request finished (any reason)."""

    def occupancy(self, waiting: int, busy: int) -> None:
        """Requests waiting for a slot, and slots busy (prefilling or decoding)."""


class Scheduler:
    """Runs requests through one engine with continuous batching (see the module docstring).

    ``eos_ids`` end a sequence; ``max_queue`` bounds the requests waiting for a slot (past it,
    :meth:`submit` raises :class:`QueueFull`); ``prefill_slice_s`` is the prefill work done between
    two decode rounds while some request decodes (at least one chunk).

    ``seed`` (per request): the engine has one random generator for all slots, so a seed reseeds it
    as the request is given its slot. A sampled request that decodes alone (no other request
    decoding or admitted while it runs) gives the same tokens for the same prompt, settings and
    seed; beside other requests, their draws interleave with its own and it does not.
    """

    def __init__(
        self, engine: Engine, tokenizer: Any, eos_ids: Sequence[int], max_queue: int = 256,
        observer: Observer | None = None, prefill_slice_s: float = 0.02,
    ) -> None:
        if max_queue < 0:
            raise STSError(f"the queue bound must be >= 0, got {max_queue}")
        self.engine, self.tokenizer, self.eos = engine, tokenizer, frozenset(eos_ids)
        self.max_queue, self.observer, self.prefill_slice_s = max_queue, observer, prefill_slice_s
        self.waiting: deque[Request] = deque()
        self.prefilling: dict[int, Request] = {}  # slot -> request, in admission order
        self.running: dict[int, Request] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: The longest one iteration of the scheduler's thread took (seconds): a cancellation of a request that holds
        #: a slot takes effect after the iteration in progress (a decode round, a prefill chunk).
        self.longest_step_s = 0.0

    # ------------------------------------------------------------------ any thread

    def submit(self, request: Request, bounded: bool = True) -> None:
        """Queue ``request`` for a slot; raise :class:`QueueFull` when ``bounded`` and ``max_queue`` requests already
        wait with no slot free for them (requests that a free slot takes at the next iteration do not count)."""
        with self._lock:
            beyond = len(self.waiting) - len(self.free_slots())
            if bounded and beyond >= self.max_queue:
                raise QueueFull(f"the server is busy (requests waiting for a slot: {beyond}); retry later",
                                code="queue_full")
            self.waiting.append(request)
        self._wake.set()

    def free_slots(self) -> list[int]:
        """Return the slots no request holds (prefilling or decoding), in order; read from any thread."""
        return [s for s in self.engine.free_slots() if s not in self.prefilling]

    def cancel(self, request: Request) -> None:
        """Stop ``request``: dropped from the queue now, or its slot freed before the next round."""
        request.cancelled = True
        with self._lock:
            queued = request in self.waiting
            if queued:
                self.waiting.remove(request)
        if queued:
            self._finish(request, "abort")  # it holds no slot: nothing of the engine's is touched
        self._wake.set()

    def cancel_all(self) -> int:
        """Cancel every request that waits, prefills or decodes (:meth:`cancel`); return how many (the server's shutdown)."""
        with self._lock:
            requests = [*self.waiting, *self.prefilling.values(), *self.running.values()]
        requests = [r for r in requests if not r.cancelled]
        for request in requests:
            self.cancel(request)
        return len(requests)

    @property
    def started(self) -> bool:
        """Return whether the scheduler's own thread drives it."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Drive the scheduler from a thread of its own (the server); other threads then only submit and cancel."""
        if self.started:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="sts-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the scheduler's thread (requests in flight stay where they are)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            started = time.perf_counter()
            try:
                worked = self.run_once()
            except Exception:  # noqa: BLE001  (engine failures fail their requests; anything else is logged, and the loop goes on)
                log.exception("scheduler iteration failed")
                worked = False
            self.longest_step_s = max(self.longest_step_s, time.perf_counter() - started)
            if not worked:
                self._wake.wait(0.1)

    # ------------------------------------------------------------------ the engine's thread

    def run_once(self) -> bool:
        """Run one iteration (free, admit, prefill, one round); return whether there was anything to do."""
        worked = self._reap()
        self._admit()
        worked |= self._prefill()
        if self.running:
            self._round()
            worked = True
        if self.observer is not None:
            self.observer.occupancy(len(self.waiting), len(self.prefilling) + len(self.running))
        return worked

    @property
    def idle(self) -> bool:
        """Return whether no request waits, prefills or decodes."""
        return not (self.waiting or self.prefilling or self.running)

    def _reap(self) -> bool:
        """Free the slots of cancelled requests; return whether there were any."""
        gone = [r for r in (*self.prefilling.values(), *self.running.values()) if r.cancelled]
        for request in gone:
            self._finish(request, "abort")
        return bool(gone)

    def _admit(self) -> None:
        """Give free slots to waiting requests, oldest first."""
        free = self.free_slots()
        while free:
            with self._lock:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            try:
                if request.params.seed is not None:
                    self.engine.generator.manual_seed(request.params.seed)
                steps = self.engine.prefill_steps(free[0], request.prompt_ids, request.params.sampling,
                                                  budget=request.params.budget)
            except Exception as exc:  # noqa: BLE001  (fails this request only; it holds no slot yet)
                self._fail(request, exc)
                continue
            slot = free.pop(0)
            request.slot, request.admitted, request.steps = slot, time.perf_counter(), steps
            self.prefilling[slot] = request

    def _prefill(self) -> bool:
        """Read prefill chunks, oldest request first, for up to ``prefill_slice_s`` while others decode; return whether any."""
        deadline = time.perf_counter() + self.prefill_slice_s
        worked = False
        while self.prefilling:
            slot, request = next(iter(self.prefilling.items()))
            worked = True
            try:
                first = next(request.steps)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001  (fails this request only)
                self._fail(request, exc)
                continue
            if first is not None:
                del self.prefilling[slot]
                self.running[slot] = request
                request.first_token_at = time.perf_counter()
                request.stats.prefill_s = request.first_token_at - request.admitted
                if self.observer is not None:
                    self.observer.first_token(request.time_to_first_token)
                self._guarded_emit(request, [first])
            if self.running and time.perf_counter() >= deadline:
                break
        return worked

    def _round(self) -> None:
        """Run one decode round and hand every decoding request its tokens."""
        try:
            out = self.engine.step()
        except Exception as exc:  # noqa: BLE001  (fails the round's requests, not the scheduler)
            for request in list(self.running.values()):
                self._fail(request, exc)
            return
        measured, self.engine.stats = self.engine.stats, GenerationStats()
        sparsity = measured.sparsity[-1] if measured.sparsity else None
        accepted = []
        for slot, request in list(self.running.items()):
            tokens = out[slot]
            accepted.append(len(tokens))
            stats = request.stats
            stats.target_forwards += 1
            stats.accepted_per_round.append(len(tokens))
            if sparsity is not None:
                stats.sparsity.append(sparsity)
            stats.draft_s += measured.draft_s
            stats.select_s += measured.select_s
            stats.verify_s += measured.verify_s
            stats.compile_s += measured.compile_s
            stats.dense_rounds += measured.dense_rounds
            self._guarded_emit(request, tokens)
        if self.observer is not None:
            self.observer.round(accepted, sparsity, measured.dense_rounds > 0)

    def _guarded_emit(self, request: Request, tokens: Sequence[int]) -> None:
        """Hand ``tokens`` to ``request``; an exception (e.g. in its detokenizer) fails that request only."""
        try:
            self._emit(request, tokens)
        except Exception as exc:  # noqa: BLE001
            self._fail(request, exc)

    def _emit(self, request: Request, tokens: Sequence[int]) -> None:
        """Append a round's tokens to ``request``, stopping at EOS, ``max_tokens`` or a stop string; deliver the delta."""
        text, ids, reason = [], [], None
        for token in tokens:
            ids.append(int(token))
            request.token_ids.append(int(token))
            text.append(request.text.add(token))
            if request.text.stopped or (token in self.eos and not request.params.ignore_eos):
                reason = "stop"
            elif len(request.token_ids) >= request.params.max_tokens:
                reason = "length"
            if reason:
                break
        if reason is None and self.engine.room(request.slot) < 0:  # type: ignore[arg-type]
            reason = "length"
        if reason is None:
            if ids:
                self._deliver(request, Delta("".join(text), ids))
            return
        self._finish(request, reason, Delta("".join(text), ids))

    def _fail(self, request: Request, exc: BaseException) -> None:
        """Finish ``request`` with an error (its slot released)."""
        if not isinstance(exc, STSError):
            log.error("request %d failed", request.id, exc_info=exc)
        self._finish(request, "error", Delta(error=exc))

    def _finish(self, request: Request, reason: str, delta: Delta | None = None) -> None:
        """Release ``request``'s slot, complete its stats and deliver its last delta with ``reason``."""
        slot = request.slot
        if slot is not None and (self.prefilling.get(slot) is request or self.running.get(slot) is request):
            self.prefilling.pop(slot, None)
            self.running.pop(slot, None)
            if request.steps is not None:
                request.steps.close()  # type: ignore[attr-defined]
            self.engine.release(slot)
        request.finish_reason = reason
        request.finished_at = time.perf_counter()
        stats = request.stats
        stats.new_tokens = len(request.token_ids)
        stats.time_s = max(0.0, request.finished_at - (request.admitted or request.arrived) - stats.compile_s)
        delta = delta or Delta()
        delta.finish_reason = reason
        if reason != "error":
            delta.text += request.text.finish()
        if self.observer is not None:
            self.observer.finished(request)
        self._deliver(request, delta)

    def _deliver(self, request: Request, delta: Delta) -> None:
        """Hand ``delta`` to the request's consumer; one that cannot take it any more (gone) cancels the request."""
        try:
            request.sink(delta)
        except Exception:  # noqa: BLE001  (e.g. the server's event loop has closed)
            log.warning("request %d: its consumer is gone", request.id, exc_info=True)
            request.cancelled = True
