"""The Python API: from checkpoints to text in three lines, through the one engine and the serving scheduler.

    from sts import LLM
    llm = LLM("path/to/target", "path/to/draft", budget=0.1)
    print(llm.generate("...long document...", max_tokens=128)[0].text)

:class:`LLM` loads a pair (HF ids, directories or GGUF files), builds one
:class:`~sts.engine.Engine` with ``slots`` batch slots and a
:class:`~sts.serve.scheduler.Scheduler` over it; ``generate``, ``stream`` and ``chat`` queue
requests there and drive it, and ``sts serve`` runs the same object from its own thread.
"""

from __future__ import annotations

import atexit
import numbers
import os
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import torch

from sts.costmodel import kv_bytes
from sts.decoding import GenerationStats
from sts.errors import STSError
from sts.models.loading import check_sources
from sts.models.transformer import Transformer
from sts.prefill import PrefillConfig
from sts.runner import (DENSE_METHODS, DraftBudget, LoadedModel, build_engine, check_pair, draft_settings, eos_ids, load,
                        methods, resolve_device)
from sts.sampling import SamplingConfig, check_seed, sampling_problem
from sts.selection import HeadMapping, SelectionConfig, check_options, is_option
from sts.selection.base import DEFAULT_BUDGET
from sts.selection.draft import DraftSelection
from sts.serve.scheduler import Delta, Request, RequestError, RequestParams, Scheduler

if TYPE_CHECKING:
    from sts.serve.parallel import TensorParallel

#: The share of free memory (device memory on CUDA, available RAM on the CPU) that the KV caches
#: may take when ``max_model_len`` is not given; the rest is left for activations and the system. The CPU's
#: share is smaller: its activations, allocator and everything else on the machine share the same RAM (the demo
#: pair in float32 with half of the RAM left after loading grew to 92% of a 24.7 GB machine after a few requests).
CACHE_MEMORY_SHARE = {"cuda": 0.5, "cpu": 0.25}


@dataclass
class Completion:
    """One prompt's result.

    ``token_ids`` are the new tokens (an end-of-sequence id that stopped it included, as
    :func:`sts.runner.run_method` returns them); ``text`` is their text without special tokens,
    cut before a stop string. ``finish_reason``: "stop" (end of sequence or stop string) or
    "length" (``max_tokens`` or the context). ``stats``: this request's rounds (phase times are
    the rounds' times, shared with the requests decoding beside it).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    stats: GenerationStats


def available_memory(device: torch.device) -> int:
    """Return the bytes free for new tensors on ``device``: free device memory on CUDA, MemAvailable (Linux) on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_rows(models: Sequence[Transformer], slots: int, max_model_len: int | None = None, least: int = 1) -> int:
    """Return each slot's cache length in rows: ``max_model_len``, else the models' context capped to what fits.

    "Fits": every slot's KV cache in both models takes at most :data:`CACHE_MEMORY_SHARE` (by device type) of
    :func:`available_memory`. Raises :class:`STSError` when ``max_model_len`` is below ``least`` (the rows one
    round needs) or exceeds a model's context (or sliding window), or when memory cannot hold a useful cache.
    """
    limit = min(m.config.max_position_embeddings for m in models)
    windows = [m.config.sliding_window for m in models if m.config.sliding_window is not None]
    limit = min([limit, *windows])
    if max_model_len is not None:
        if not least <= max_model_len <= limit:
            raise STSError(f"max model length must be in [{least}, {limit}] (the models' context), got {max_model_len}")
        return max_model_len
    weights = models[0].embed_tokens.weight
    row_bytes = slots * sum(kv_bytes(m.config, 1, weights.element_size()) for m in models)
    share = CACHE_MEMORY_SHARE.get(weights.device.type, CACHE_MEMORY_SHARE["cpu"])
    fit = int(available_memory(weights.device) * share) // row_bytes
    if fit < 64:
        raise STSError(f"memory holds only {fit} cache rows per slot for {slots} slots: use fewer slots")
    return min(limit, fit)


#: The numeric settings (of a request, then of :class:`LLM`) and the types each takes (bool excluded: Python's bool
#: is an int).
_NUMBERS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,), "top_k": (int,), "seed": (int,), "temperature": (int, float), "top_p": (int, float),
    "budget": (int, float),
    **dict.fromkeys(("sink", "window", "dense_layers", "gamma", "slots", "max_queue", "max_model_len", "prefill_chunk"), (int,)),
}


def _check_types(**values: Any) -> None:
    """Raise :class:`RequestError` naming the first setting of ``values`` (None: unset) that is not a number of its kind."""
    for name, value in values.items():
        kinds = _NUMBERS[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            kind = "an integer" if kinds == (int,) else "a number"
            raise RequestError(f"{name} must be {kind}, got {value!r}", name)


def _plain(prompts: Any) -> Any:
    """Return a torch tensor's or numpy array's ids as (nested) lists of ints; anything else as it is."""
    return prompts.tolist() if isinstance(prompts, torch.Tensor) or type(prompts).__module__ == "numpy" else prompts


def _is_integer(value: Any) -> bool:
    """Return whether ``value`` is a token id: an integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Return the dtype to load in: as given, else bfloat16 on CUDA and float32 on the CPU."""
    from sts.models.loading import parse_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    return parse_dtype(resolve_device(device, dtype)[1])


#: The roles a chat message may have (OpenAI's; the server's request model takes the same).
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def require_unicode(text: str, param: str) -> None:
    """Raise :class:`RequestError` (naming ``param``) when ``text`` is not valid Unicode: a lone surrogate, which is
    what undecodable bytes become on a command line (``surrogateescape``) or a JSON ``\\udcff`` escape; tokenizers
    cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{param} is not valid Unicode text: a lone surrogate {text[exc.start]!r} at character "
                           f"{exc.start} (bytes that are not UTF-8?)", param) from None


class LLM:
    """A target (and draft) loaded once, decoding any number of prompts with continuous batching.

    ``target``, ``draft``: HF hub ids, checkpoint directories or ``.gguf`` files (or models
    loaded with :func:`sts.runner.load`). ``method``: one of :func:`sts.runner.methods`; by
    default ``sts`` with a draft, ``autoregressive`` without. ``budget`` (selection methods only; None:
    :data:`~sts.selection.base.DEFAULT_BUDGET`), ``sink``, ``window``,
    ``dense_layers``, ``mapping``, ``draft_budget``, ``draft_selection``, ``prefill`` and ``**options`` (e.g.
    ``rerank=0``) are ``sts generate``'s settings of the same names (``draft_budget`` "auto": with ``sts``, the later
    draft steps of sparse rounds read :data:`~sts.runner.DEFAULT_DRAFT_BUDGET` rows scored by STS, the first one
    included, :func:`sts.runner.draft_settings`;
    None or "dense": a dense draft). ``slots``: sequences decoded
    together; ``max_model_len``: each slot's context in tokens (default: the models' context, capped so that the
    caches take at most half of the free GPU memory, a quarter of the free RAM on the CPU). ``prefill_chunk``:
    prompt tokens per prefill forward, the unit that prefill interleaves with decode rounds (default
    512 on the CPU, 8192 on CUDA). ``device``: default CUDA
    when there is one; ``dtype``: default bfloat16 on CUDA, float32 on the CPU. ``seed``: the
    engine's random generator (sampling). ``max_queue``: requests that may wait for a slot when
    serving (``generate`` waits without bound). ``tensor_parallel``: split the target by heads over
    this many processes (:mod:`sts.serve.parallel`: this one is rank 0 and spawns the others, which
    import the caller's main module as ``multiprocessing``'s spawn does, so a script guards its entry
    with ``if __name__ == "__main__"``; ``device`` "cpu" joins them with gloo, "cuda" with NCCL, rank
    ``r`` on GPU ``r``; :meth:`close` stops them, as does the end of this process). ``verify``:
    "auto" verifies a selection method's rounds densely below the break-even context
    (:mod:`sts.costmodel`), "sparse" always sparsely.

    Not thread-safe by itself: call it from one thread, or :meth:`start` its scheduler's thread,
    after which any thread may call it (the server does).

    Raises :class:`STSError` for impossible settings (before loading anything when it can).
    """

    def __init__(
        self, target: str | Path | LoadedModel, draft: str | Path | LoadedModel | None = None, method: str | None = None, *,
        budget: float | None = None, sink: int = 4, window: int = 64, dense_layers: int = 0, gamma: int = 4,
        mapping: str | None = None, draft_budget: DraftBudget = "auto", draft_selection: DraftSelection | None = None,
        prefill: PrefillConfig | None = None, slots: int = 1, max_model_len: int | None = None,
        prefill_chunk: int | None = None, device: str | None = None, dtype: str | torch.dtype | None = None,
        seed: int = 0, max_queue: int = 256, verify: Literal["auto", "sparse"] = "auto",
        tensor_parallel: int | TensorParallel = 1, **options: Any,
    ) -> None:
        # The other tensor-parallel ranks build the same LLM from these: every argument but the models.
        settings = {k: v for k, v in locals().items()
                    if k not in ("self", "target", "draft", "tensor_parallel", "options")}
        for name, model, optional in (("target", target, False), ("draft", draft, True)):
            if not (isinstance(model, (str, Path, LoadedModel)) or (optional and model is None)):
                raise STSError(f"{name} must be a checkpoint directory, a .gguf file, a hub id or a loaded model, "
                               f"got {type(model).__name__}")
        self.method = method or ("sts" if draft is not None else "autoregressive")
        if self.method not in methods():
            raise STSError(f"unknown method {self.method!r} (choose from {', '.join(methods())})")
        _check_types(budget=budget, sink=sink, window=window, dense_layers=dense_layers, gamma=gamma, slots=slots,
                     seed=seed, max_queue=max_queue, max_model_len=max_model_len, prefill_chunk=prefill_chunk)
        if gamma < 1:
            raise STSError(f"gamma must be >= 1, got {gamma}")
        check_seed(seed)
        #: Rows a round writes past a sequence (its drafts and the target's token; one without a draft).
        self.scratch = 1 if self.method == "autoregressive" else gamma + 1
        self.least_len = self.scratch + 2  # checked here, before loading; cache_rows names the whole range after it
        if max_model_len is not None and max_model_len < self.least_len:
            raise STSError(f"max_model_len must be >= {self.least_len} (a prompt token, a new token and the {self.scratch} "
                           f"rows a round writes), got {max_model_len}")
        if budget is not None and self.method in DENSE_METHODS:
            raise STSError(f"budget applies to selection methods (e.g. method='sts'), not {self.method}")
        self.selection = SelectionConfig(budget=DEFAULT_BUDGET if budget is None else budget, sink=sink, window=window,
                                         dense_layers=dense_layers)
        self.draft_budget, self.draft_selection = draft_settings(self.method, draft_budget, draft_selection)
        self.options = dict(options)
        for name in options:
            if not is_option(name):  # a misspelt keyword, not a policy's option
                raise TypeError(f"LLM() got an unexpected keyword argument {name!r}")
        if options:
            if self.method in DENSE_METHODS:
                raise STSError(f"options {', '.join(options)} apply to selection methods, not {self.method}")
            check_options(self.method, options)
        if mapping is not None:
            HeadMapping.load(mapping)
        if slots < 1:
            raise STSError(f"slots must be >= 1, got {slots}")
        if self.method != "autoregressive" and draft is None:
            raise STSError(f"method {self.method} needs a draft model")
        device = resolve_device(device, None)[0]
        self.parallel: TensorParallel | None = None
        if not isinstance(tensor_parallel, int):  # one of the other ranks (sts.serve.parallel.follow_llm)
            self.parallel = tensor_parallel
        elif tensor_parallel != 1:
            from sts.serve.parallel import TensorParallel

            settings.update(options, device=device)
            self.parallel = TensorParallel.start(tensor_parallel, device, target, draft, settings)
        try:
            self._build(target, draft, device, dtype, slots, max_model_len, dict(
                gamma=gamma, selection=self.selection, mapping=mapping, options=options, draft_budget=self.draft_budget,
                draft_selection=self.draft_selection, prefill=prefill, prefill_chunk=prefill_chunk, seed=seed, verify=verify))
        except BaseException:
            if self.parallel is not None:
                self.parallel.close(abort=True)
            raise
        if self.parallel is not None and self.parallel.leads:
            atexit.register(self.close)  # the other ranks' processes end with this one
        #: Draft tokens per round (0 for autoregressive decoding).
        self.gamma = self.engine.gamma
        self.scheduler = Scheduler(self.engine, self.tokenizer, eos_ids(self.target), max_queue)

    def _build(self, target: Any, draft: Any, device: str, dtype: Any, slots: int, max_model_len: int | None,
               engine_settings: dict[str, Any]) -> None:
        """Load the pair (under tensor parallelism, this rank's part of the target) and build the engine."""
        part = self.parallel
        if part is not None:
            device = part.device
        sources = (target, draft if self.method != "autoregressive" else None)
        check_sources(*(None if isinstance(s, LoadedModel) or s is None else str(s) for s in sources))
        loaded = [m if isinstance(m, LoadedModel) or m is None
                  else load(str(m), _dtype(dtype, device), device, part.shard if part is not None and i == 0 else None)
                  for i, m in enumerate(sources)]
        self.target, self.draft = loaded
        if self.draft is not None:
            check_pair(self.target, self.draft)
        self.tokenizer = self.target.tokenizer
        models = [m.model for m in loaded if m is not None]
        if part is None:
            self.max_model_len = cache_rows(models, slots, max_model_len, self.least_len)
        else:  # rank 0's memory decides: every rank's engine must have the same shape
            self.max_model_len = part.agree(cache_rows(models, slots, max_model_len, self.least_len) if part.leads else None)
        engine = build_engine(self.method, self.target, self.draft, slots=slots, max_len=self.max_model_len,
                              **engine_settings)
        self.engine = part.drive(engine) if part is not None else engine

    @property
    def settings(self) -> dict[str, Any]:
        """Return the settings fixed when the engine was built (method, gamma, selection, draft budget)."""
        sel = self.selection
        budget = None if self.method in DENSE_METHODS else sel.budget  # dense methods read every row
        return {"method": self.method, "gamma": self.gamma, "budget": budget, "sink": sel.sink, "window": sel.window,
                "dense_layers": sel.dense_layers, "draft_budget": self.draft_budget,
                "draft_selection": self.draft_selection if self.draft_budget is not None else None}

    # ------------------------------------------------------------------ requests

    def prompt_ids(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        """Return the token ids of a text prompt (with the tokenizer's special tokens), or of a list of ids as given.

        Raises :class:`RequestError` for text without a tokenizer or not valid Unicode (:func:`require_unicode`), an
        empty prompt, or ids outside the vocabulary.
        """
        prompt = _plain(prompt)
        if isinstance(prompt, str):
            require_unicode(prompt, param)
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer: give the prompt as token ids", param)
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
            bad = [t for t in prompt if not _is_integer(t)]
            if bad:
                raise RequestError(f"a prompt is text or a list of token ids (integers), got {type(bad[0]).__name__} "
                                   f"{bad[0]!r} in the list", param)
            ids = [int(t) for t in prompt]
        else:
            raise RequestError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}", param)
        vocab = self.target.model.config.vocab_size
        if not ids:
            raise RequestError("the prompt is empty (no tokens)", param)
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param)
        return ids

    def chat_ids(self, messages: Sequence[dict[str, Any]], param: str = "messages") -> list[int]:
        """Return the token ids of a conversation in the target tokenizer's chat template, ready for the assistant's turn.

        Raises :class:`RequestError` without a chat template, for a message that is not a dict with a role of
        :data:`CHAT_ROLES` (the server's), a message field that is not valid Unicode (named ``messages[i].field``) or
        for messages the template refuses.
        """
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template: use the completions endpoint", param)
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise RequestError(f"a message is a dict with a role and content, got {type(message).__name__}",
                                   f"{param}[{i}]")
            if message.get("role") not in CHAT_ROLES:
                raise RequestError(f"a message's role is one of {', '.join(CHAT_ROLES)}, got {message.get('role')!r}",
                                   f"{param}[{i}].role")
            if "content" not in message:  # (null is a message's content too: an assistant turn without text)
                raise RequestError("a message needs content (text, or null)", f"{param}[{i}].content")
            if not isinstance(message.get("content"), (str, list, type(None))):
                raise RequestError(f"a message's content is text, got {type(message['content']).__name__}",
                                   f"{param}[{i}].content")
            for key, value in message.items():
                if isinstance(value, str):
                    require_unicode(value, f"{param}[{i}].{key}")
        try:
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as exc:  # noqa: BLE001  (jinja raises whatever the template raises)
            raise RequestError(f"the chat template refused these messages: {exc}", param) from None
        return self.prompt_ids(list(ids), param)

    def params(
        self, prompt_tokens: int, max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
        stop: str | Sequence[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
        budget: float | None = None,
    ) -> RequestParams:
        """Return a request's parameters for a prompt of ``prompt_tokens`` (``max_tokens`` None: all the context left;
        ``ignore_eos``: decode past end-of-sequence ids; ``budget``: this request's selection budget, rows per KV head
        or a fraction of its context, None: the engine's).

        Raises :class:`RequestError` (naming the parameter) when the prompt or ``max_tokens`` do not fit the context,
        a sampling setting is out of range, or the budget is impossible (below sink + window, not > 0) or the method
        cannot give one request a budget of its own (:meth:`Engine.slot_settings`).
        """
        _check_types(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, budget=budget)
        if not (stop is None or isinstance(stop, str)
                or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop))):
            raise RequestError(f"stop must be a string or a list of strings, got {stop!r}", "stop")
        scratch = self.scratch
        context = self.max_model_len - scratch - 1
        if prompt_tokens > context:
            raise RequestError(f"the prompt has {prompt_tokens} tokens but this model's context holds {context} "
                               f"(max model length {self.max_model_len}, {scratch} rows for a round, 1 new token)",
                               "prompt", "context_length_exceeded")
        room = self.max_model_len - prompt_tokens - scratch
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if max_tokens > room:
            tokens = f"{prompt_tokens} token{'s' * (prompt_tokens != 1)}"
            raise RequestError(f"max_tokens {max_tokens} goes past the context: a prompt of {tokens} leaves "
                               f"room for {room} (max model length {self.max_model_len}, {scratch} rows for a round)",
                               "max_tokens", "context_length_exceeded")
        problem = sampling_problem(temperature, top_k, top_p)
        if problem is not None:
            raise RequestError(problem[1], problem[0])
        try:
            check_seed(0 if seed is None else seed)
        except STSError as exc:
            raise RequestError(str(exc), "seed") from None
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if stops and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this checkpoint has none", "stop")
        try:
            self.engine.slot_settings(budget)
        except STSError as exc:
            raise RequestError(str(exc), "budget", "invalid_value") from None  # its messages name the budget
        return RequestParams(max_tokens, SamplingConfig(temperature, top_k, top_p), stops, seed, ignore_eos, budget)

    def submit(self, prompt_ids: Sequence[int], params: RequestParams, sink: Any, bounded: bool = True) -> Request:
        """Queue a request whose deltas go to ``sink`` (called from the scheduler's thread); return it."""
        request = Request(prompt_ids, params, sink, self.tokenizer)
        self.scheduler.submit(request, bounded)
        return request

    # ------------------------------------------------------------------ driving

    def start(self) -> None:
        """Run the scheduler in a thread of its own, so that several threads can submit at once (the server)."""
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler's thread (requests then run when a caller drives them again)."""
        self.scheduler.stop()

    def close(self) -> None:
        """Stop the scheduler's thread and, under tensor parallelism, the other ranks (the LLM then decodes no more).

        Without tensor parallelism it is :meth:`stop`.
        """
        self.stop()
        if self.parallel is not None:
            self.parallel.close()

    def _deltas(self, request: Request, outbox: queue.SimpleQueue) -> Iterator[Delta]:
        """Yield ``request``'s deltas until it finishes, driving the scheduler unless its own thread does.

        Leaving early (a closed generator) cancels the request and frees its slot.
        """
        try:
            while True:
                while outbox.empty() and not self.scheduler.started:
                    if not self.scheduler.run_once() and outbox.empty():
                        raise RuntimeError(f"request {request.id} is neither queued nor decoding")
                delta: Delta = outbox.get()
                if delta.error is not None:
                    raise delta.error
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if request.finish_reason is None:
                self.scheduler.cancel(request)

    def _start_all(self, prompts: Sequence[list[int]], params: dict[str, Any]) -> list[tuple[Request, queue.SimpleQueue]]:
        """Submit one request per prompt (every prompt checked before any is queued); return them with their outboxes."""
        checked = [(ids, self.params(len(ids), **params)) for ids in prompts]
        started = []
        for ids, p in checked:
            outbox: queue.SimpleQueue = queue.SimpleQueue()
            started.append((self.submit(ids, p, outbox.put, bounded=False), outbox))
        return started

    def _complete(self, prompts: Sequence[list[int]], params: dict[str, Any]) -> list[Completion]:
        """Decode every prompt (together, as slots allow) and return their completions in order."""
        started = self._start_all(prompts, params)
        results = []
        try:
            for request, outbox in started:
                text = "".join(d.text for d in self._deltas(request, outbox))
                results.append(Completion(text, list(request.token_ids), request.finish_reason or "", request.prompt_ids,
                                          request.stats))
        finally:
            for request, _ in started:
                if request.finish_reason is None:
                    self.scheduler.cancel(request)
        return results

    # ------------------------------------------------------------------ the API

    def generate(
        self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], max_tokens: int | None = 64,
        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] | None = None,
        seed: int | None = None, budget: float | None = None,
    ) -> list[Completion]:
        """Return one :class:`Completion` per prompt (text, or a list of token ids), decoded together as slots allow.

        ``temperature`` 0 is greedy; ``max_tokens`` None: up to the context; ``budget``: these prompts' selection
        budget (rows per KV head, or a fraction of each one's context; None: the LLM's), each prompt reading what it
        would alone at that budget. Raises :class:`RequestError` for a prompt or setting that cannot be served
        (before any decoding) and :class:`STSError` for other user errors.
        """
        prompts = _plain(prompts)
        if not isinstance(prompts, Sequence) or not (prompts or isinstance(prompts, str)):
            raise RequestError("prompts must be text, token ids, or a non-empty list of those", "prompt")
        batch = [prompts] if isinstance(prompts, str) or _is_integer(prompts[0]) else list(prompts)
        ids = [self.prompt_ids(p) for p in batch]  # type: ignore[arg-type]
        return self._complete(ids, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                        stop=stop, seed=seed, budget=budget))

    def chat(
        self, messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]], max_tokens: int | None = 64,
        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] | None = None,
        seed: int | None = None, budget: float | None = None,
    ) -> list[Completion]:
        """Return the assistant's reply to a conversation (a list of ``{"role", "content"}``), or one per conversation
        (``budget`` as :meth:`generate`'s)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if not conversations:
            raise RequestError("messages must be a conversation or a non-empty list of conversations", "messages")
        ids = [self.chat_ids(c) for c in conversations]  # type: ignore[arg-type]
        return self._complete(ids, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                        stop=stop, seed=seed, budget=budget))

    def stream(
        self, prompt: str | Sequence[int], max_tokens: int | None = 64, temperature: float = 0.0, top_p: float = 1.0,
        top_k: int = 0, stop: str | Sequence[str] | None = None, seed: int | None = None, budget: float | None = None,
    ) -> Iterator[str]:
        """Yield the text of one prompt's continuation piece by piece as rounds are accepted (pieces join to the text
        :meth:`generate` returns). Leaving the loop early cancels the request."""
        ids = self.prompt_ids(prompt)
        ((request, outbox),) = self._start_all([ids], dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                                           top_k=top_k, stop=stop, seed=seed, budget=budget))
        for delta in self._deltas(request, outbox):
            if delta.text:
                yield delta.text
