"""Tensor parallelism: the target split by heads over several processes joined by torch.distributed.

As in gpt-fast's ``tp.py``, an already-built :class:`~sts.models.transformer.Transformer` is
sharded in place and the model code knows nothing of it. The splits are Megatron-LM's (Shoeybi
et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
Parallelism"): column-parallel q/k/v, by KV-head groups (rank ``r`` of ``world`` keeps
``n_kv_heads / world`` KV heads and their query heads), and column-parallel gate/up;
row-parallel o and down, each followed by one all-reduce (a forward hook) and then, once, its
bias (``RowParallelLinear``). Embeddings, norms and the LM head stay whole on every rank.

Each rank's KV cache holds only its own KV heads, so selection (STS reads its rows of the head
mapping, :meth:`~sts.selection.mapping.HeadMapping.shard`), re-ranking and the sparse verify
read local rows with no further communication: two all-reduces per layer are all a round adds.
After them every rank holds the same residual stream (an all-reduce leaves the same sum on
every rank), so the whole parts (norms, LM head) and the draft, which runs whole on every rank,
compute the same logits everywhere, and the engine's generator, seeded alike, draws the same
tokens: every rank runs the unchanged :class:`~sts.engine.Engine` on its part.

On CUDA, NVLink multicast stays off in every process (:data:`NO_MULTICAST`; DESIGN.md,
"Scale-out facts").
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from sts.errors import STSError
from sts.models.config import ModelConfig
from sts.models.loading import build_model, load_model, read_config
from sts.models.transformer import Linear, Transformer

#: Set in every process the launcher starts: NVLink multicast (NVLS) is never used here.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

#: Layer weights split along their output rows (column-parallel); the rest of a layer is whole.
_COLUMN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj")
#: Layer weights split along their input columns (row-parallel): their outputs are summed over ranks.
_ROW = ("o_proj", "down_proj")

#: (dimension, [(start, stop), ...]): the ranges of a weight a rank keeps, concatenated in order.
Split = tuple[int, list[tuple[int, int]]]


class _AllReduce:
    """Forward hook of a row-parallel linear: sum the ranks' partial outputs, then add the bias once."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        """Return the all-reduced ``output`` ``[..., out]`` plus the module's ``reduced_bias``."""
        output = output.contiguous()
        dist.all_reduce(output, group=self.group)
        bias = module.reduced_bias
        return output if bias is None else output + bias


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s part of a model split over ``world`` ranks (a :class:`~sts.models.loading.Partition`).

    ``group``: the process group of the ranks (None: the default group). Raises STSError for a
    rank outside ``[0, world)``.
    """

    rank: int
    world: int
    group: dist.ProcessGroup | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise STSError(f"tensor-parallel rank {self.rank} of {self.world} does not exist")

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """Return the config of this rank's part of a whole ``config`` model.

        Raises STSError when the KV heads or the feed-forward width do not split into ``world``
        equal parts, or when ``config`` is already a part.
        """
        if config.shard != (0, 1):
            raise STSError(f"{config.name} is already split over {config.shard[1]} tensor-parallel ranks")
        for what, n in (("KV heads", config.n_kv_heads), ("feed-forward width (intermediate size)", config.intermediate_size)):
            if n % self.world:
                raise STSError(f"--tensor-parallel {self.world}: {config.name} has {n} {what}, not divisible by {self.world}")
        w = self.world
        return dataclasses.replace(config, n_heads=config.n_heads // w, n_kv_heads=config.n_kv_heads // w,
                                   intermediate_size=config.intermediate_size // w, shard=(self.rank, w))

    def split(self, config: ModelConfig, name: str) -> Split | None:
        """Return which part of weight ``name`` (HF or fused naming) of a whole ``config`` model this rank keeps;
        None: all of it.

        q/k/v rows go by heads (the fused ``qkv_proj`` is ``[q | k | v]``: three ranges), gate/up rows
        by feed-forward units (``gate_up_proj`` is ``[gate | up]``: two ranges), biases with their
        rows; o and down keep their input columns, and their biases whole (added after the sum).
        """
        parts = name.split(".")
        if "layers" not in parts or len(parts) < 2:
            return None
        module, kind = parts[-2], parts[-1]
        hd, w, r = config.head_dim, self.world, self.rank

        def own(n: int, offset: int = 0) -> tuple[int, int]:
            return offset + r * n // w, offset + (r + 1) * n // w

        q_rows, kv_rows, ffn = config.n_heads * hd, config.n_kv_heads * hd, config.intermediate_size
        columns = {"q_proj": [own(q_rows)], "k_proj": [own(kv_rows)], "v_proj": [own(kv_rows)],
                   "qkv_proj": [own(q_rows), own(kv_rows, q_rows), own(kv_rows, q_rows + kv_rows)],
                   "gate_proj": [own(ffn)], "up_proj": [own(ffn)], "gate_up_proj": [own(ffn), own(ffn, ffn)]}
        if module in columns:
            return 0, columns[module]
        if module in _ROW and kind == "weight":
            return 1, [own(q_rows if module == "o_proj" else ffn)]
        return None

    def take(self, config: ModelConfig, name: str, tensor: Any) -> Tensor:
        """Return this rank's part of weight ``name`` of a whole ``config`` model: ``tensor`` is a Tensor or a
        safetensors slice (only the part is read). Raises STSError as :meth:`local_config` does."""
        self.local_config(config)
        split = self.split(config, name)
        if split is None:
            return tensor[:]
        dim, ranges = split
        lead = (slice(None),) * dim
        return torch.cat([tensor[lead + (slice(start, stop),)] for start, stop in ranges], dim=dim)

    def build(self, config: ModelConfig, weights: dict[str, Tensor], dtype: torch.dtype, device: str | torch.device) -> Transformer:
        """Return this rank's part of a whole ``config`` model from the parts :meth:`take` returned (HF names)."""
        return self.attach(build_model(self.local_config(config), weights, dtype, device))

    def attach(self, model: Transformer) -> Transformer:
        """Return ``model``, whose weights are this rank's parts, made to run as one: the per-layer head counts and
        linear widths of its part, an all-reduce after o and down, and a KV cache to be re-made for its KV heads."""
        local = model.config
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.n_heads, attn.n_kv_heads, attn.cache = local.n_heads, local.n_kv_heads, None
            for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                linear.out_features, linear.in_features = linear.weight.shape
            for linear in (attn.o_proj, mlp.down_proj):
                _reduce_output(linear, self.group)
        model.batch_size = model.max_len = 0
        return model


def _reduce_output(linear: Linear, group: dist.ProcessGroup | None) -> None:
    """Make ``linear`` row-parallel: its output is summed over the ranks, and its bias added once, after the sum."""
    bias = linear.bias
    linear.bias = None
    linear.register_buffer("reduced_bias", None if bias is None else bias.detach(), persistent=False)
    linear.register_forward_hook(_AllReduce(group))


def shard_model(model: Transformer, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """Return ``model`` (a whole one, changed in place) cut down to rank ``rank``'s part of ``world``.

    Its forward then all-reduces over ``group`` (default: the default process group, which must
    exist before the first forward). ``model.config`` becomes the part's (``shard = (rank, world)``).
    Raises STSError when the KV heads or the feed-forward width do not divide by ``world``.
    """
    shard = Shard(rank, world, group)
    whole = model.config
    local = shard.local_config(whole)
    for name, param in list(model.named_parameters()):
        if shard.split(whole, name) is not None:
            owner, leaf = name.rsplit(".", 1)
            part = shard.take(whole, name, param.detach())
            setattr(model.get_submodule(owner), leaf, nn.Parameter(part, requires_grad=False))
    model.config = local
    return shard.attach(model)


def load_sharded(
    source: str, rank: int, world: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    group: dist.ProcessGroup | None = None,
) -> tuple[Transformer, Any]:
    """Return (rank ``rank``'s part of the model at ``source``, its tokenizer or None), as :func:`shard_model` would
    cut it. From safetensors (an HF directory or hub id) only this rank's slices are read; a GGUF file
    is dequantised whole first. Raises STSError as :func:`~sts.models.loading.load_model` and
    :meth:`Shard.local_config` do."""
    return load_model(source, dtype, device, partition=Shard(rank, world, group))


# ---------------------------------------------------------------------------------------------- launcher


def _torchrun() -> bool:
    """Return whether this process is one rank started by ``torchrun`` (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _loopback() -> str:
    """Return the name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS)."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def device_type(device: str) -> str:
    """Return "cpu" or "cuda" for a ``--device`` that tensor parallelism can use (rank ``r`` takes GPU ``r``).

    Raises STSError for a device that is not one, or one with an index (``cuda:1``).
    """
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise STSError(f"--device must be cpu or cuda, got {device!r}") from None
    if parsed.type not in ("cpu", "cuda") or parsed.index is not None:
        raise STSError(f"--device must be cpu or cuda here (tensor-parallel rank r takes GPU r), not {device!r}")
    return parsed.type


def rank_device(kind: str) -> str:
    """Return this rank's device for a device type: its own GPU (set when it joined) or the CPU."""
    return f"cuda:{torch.cuda.current_device()}" if kind == "cuda" else "cpu"


def _join(rank: int, world: int, init: str, kind: str, spawned: bool) -> None:
    """Join the ``world``-rank process group at ``init`` as rank ``rank`` on device type ``kind``.

    Sets :data:`NO_MULTICAST`; a process started on this host (``spawned``) keeps its transports on
    the loopback interface; a CUDA rank takes its local GPU.
    """
    os.environ.update(NO_MULTICAST)
    if spawned:
        os.environ.setdefault("GLOO_SOCKET_IFNAME" if kind == "cpu" else "NCCL_SOCKET_IFNAME", _loopback())
    device = None
    if kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", init_method=init, rank=rank, world_size=world,
                            device_id=device)


def _rank_main(
    rank: int, world: int, init: str, kind: str, fn: Callable[..., None], args: tuple[Any, ...], errors: Any,
) -> None:
    """Join the process group as rank ``rank`` and run ``fn(rank, world, *args)``; pass an STSError's message to
    ``errors`` (a queue, or None in-process)."""
    if kind == "cpu":  # the host's cores are shared by its ranks
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    _join(rank, world, init, kind, spawned=errors is not None)
    try:
        fn(rank, world, *args)
        # Without it a rank may close its connections while another still reads the last result
        # (seen with gloo: the process aborts at exit).
        dist.barrier()
    except STSError as exc:
        if errors is not None:
            errors.put(str(exc))
        raise
    finally:
        dist.destroy_process_group()
    if errors is not None:
        # A process spawned here ends without the interpreter's teardown: there gloo's C++ threads
        # were seen to abort it now and then ("terminate called without an active exception",
        # SIGABRT, after the work was done; about 1 run in 10 of the CLI's two-rank test on CI). The exit handlers
        # still run: multiprocessing's among them, which release the semaphores this process made.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_ranks(fn: Callable[..., None], world: int, args: tuple[Any, ...] = (), kind: str = "cpu") -> None:
    """Run ``fn(rank, world, *args)`` on every rank of a ``world``-rank process group (gloo on the CPU; NCCL on CUDA,
    rank ``r`` on GPU ``r`` of its host; ``kind`` is the device type).

    Under ``torchrun`` this process is one rank (its group from the environment); otherwise
    ``world`` processes are spawned here (``torch.multiprocessing.spawn``), meeting through a file
    store, their transports bound to the loopback interface. Each process gets :data:`NO_MULTICAST`.
    An STSError in a rank is raised here with its message (the other ranks are stopped).
    """
    if world < 1:
        raise STSError(f"--tensor-parallel must be >= 1, got {world}")
    if _torchrun():
        if int(os.environ["WORLD_SIZE"]) != world:
            raise STSError(f"--tensor-parallel {world}, but torchrun started {os.environ['WORLD_SIZE']} processes")
        _rank_main(int(os.environ["RANK"]), world, "env://", kind, fn, args, None)
        return
    _check_gpus(kind, world)
    errors = mp.get_context("spawn").SimpleQueue()
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # its "Terminating process ..." warnings: the failed rank's error says why
    with tempfile.TemporaryDirectory(prefix="sts-tp-") as rendezvous:
        init = f"file://{os.path.join(rendezvous, 'store')}"
        try:
            mp.spawn(_rank_main, args=(world, init, kind, fn, args, errors), nprocs=world)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            if not errors.empty():
                raise STSError(errors.get()) from None
            if isinstance(exc, mp.ProcessExitedException):  # killed (out of memory, a signal): no traceback of ours
                raise STSError(f"a tensor-parallel rank ended without finishing: {exc}") from None
            raise
        finally:
            spawn_log.setLevel(level)


def _check_gpus(kind: str, world: int) -> None:
    """Raise STSError when ``world`` CUDA ranks would not each have a GPU of this host."""
    if kind == "cuda" and torch.cuda.device_count() < world:
        raise STSError(f"--tensor-parallel {world} needs {world} GPUs, this host has {torch.cuda.device_count()}")


class Workers:
    """Ranks ``1 .. world - 1`` spawned by :func:`start_workers`, this process being rank 0 of their group."""

    def __init__(self, world: int, kind: str, processes: list[Any], errors: Any, rendezvous: str) -> None:
        self.world, self.kind = world, kind
        self.processes, self.errors, self.rendezvous = processes, errors, rendezvous
        self.closed = False

    def check(self) -> None:
        """Raise STSError when a worker has exited (with the STSError it reported, if any)."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                if not self.errors.empty():
                    raise STSError(self.errors.get())
                raise STSError(f"tensor-parallel rank {rank} has exited (exit code {process.exitcode})")

    def close(self, abort: bool = False, timeout: float = 60.0) -> None:
        """Leave the group and wait for the workers to end (``fn`` has returned there); with ``abort``, or past
        ``timeout`` seconds, terminate them. Idempotent."""
        if self.closed:
            return
        self.closed = True
        abort = abort or not all(process.is_alive() for process in self.processes)  # a barrier would wait forever
        try:
            if not abort:
                dist.barrier()  # the workers' last collective (see _rank_main)
        finally:
            dist.destroy_process_group()
            for process in self.processes:
                process.join(0 if abort else timeout)
                if process.is_alive():
                    process.terminate()
                    process.join(10)
            shutil.rmtree(self.rendezvous, ignore_errors=True)


def start_workers(world: int, kind: str, fn: Callable[..., None], args: tuple[Any, ...] = ()) -> Workers:
    """Spawn ranks ``1 .. world - 1`` running ``fn(rank, world, *args)``, and join their group here as rank 0.

    For a leader-follower split (the server: rank 0 answers requests and tells the others what to
    run), unlike :func:`run_ranks` where every rank runs the same function and the caller waits.
    The processes meet as in :func:`run_ranks`; on CUDA this process takes GPU 0. Call
    :meth:`Workers.close` once ``fn`` can return everywhere. Raises STSError under ``torchrun``
    (its ranks are started for you there), when a process group already exists here, or for too
    few GPUs.
    """
    if world < 2:
        raise STSError(f"tensor parallelism takes 2 or more ranks (1: none), got {world}")
    if _torchrun():
        raise STSError("this command starts its own tensor-parallel ranks: run it without torchrun")
    if dist.is_initialized():
        raise STSError("a tensor-parallel group already runs in this process: close it first")
    _check_gpus(kind, world)
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    rendezvous = tempfile.mkdtemp(prefix="sts-tp-")
    init = f"file://{os.path.join(rendezvous, 'store')}"
    processes = [context.Process(target=_rank_main, args=(rank, world, init, kind, fn, args, errors), name=f"sts-rank{rank}")
                 for rank in range(1, world)]
    for process in processes:
        process.start()
    workers = Workers(world, kind, processes, errors, rendezvous)
    try:
        _join(0, world, init, kind, spawned=True)
    except BaseException:
        workers.closed = True
        for process in processes:
            process.terminate()
        shutil.rmtree(rendezvous, ignore_errors=True)
        raise
    return workers


@contextlib.contextmanager
def quiet(silent: bool) -> Iterator[None]:
    """Send stdout and stderr to nowhere while ``silent`` (every rank but 0: only rank 0 prints)."""
    if not silent:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _generate_rank(rank: int, world: int, command: Callable[..., int], argv: list[str], kind: str) -> None:
    """Run ``command(args, load=...)``, ``args`` parsed here from ``argv``, as rank ``rank``: the target loaded as this
    rank's part, the draft whole.

    The command line is parsed again in each rank, by the code that rank imported: a spawned rank
    imports ``sts`` afresh, and a Namespace made by another version of the parser (the tree edited
    between the launch and the spawn) would lack options that its code reads.
    """
    from sts.cli import build_parser
    from sts.models.loading import parse_dtype
    from sts.runner import LoadedModel, load_pair, resolve_device

    device = rank_device(kind)
    shard = Shard(rank, world)

    def load(options: argparse.Namespace, with_draft: bool = True) -> tuple[LoadedModel, LoadedModel | None]:
        draft = options.draft if with_draft else None
        dtype = resolve_device(device, options.dtype)[1]  # unset: bfloat16 on CUDA, float32 on the CPU
        return load_pair(options.target, draft, parse_dtype(dtype), device, partition=shard)

    args = build_parser().parse_args(argv)
    args.argv = argv
    with quiet(rank > 0):
        command(args, load=load)


def launch_generate(command: Callable[..., int], args: argparse.Namespace) -> int:
    """Run ``sts generate`` (``command``, called as ``command(args, load=...)``) on ``args.tensor_parallel`` ranks
    and return its exit status; only rank 0 prints. ``args.argv`` is the command line (parsed again in each rank).

    ``--device cpu`` joins the ranks with gloo; ``--device cuda`` with NCCL, one GPU per rank.
    Raises STSError for an impossible device or rank count, or any rank's STSError.
    """
    kind = device_type(args.device)
    check_split(args.target, args.tensor_parallel)
    run_ranks(_generate_rank, args.tensor_parallel, (command, list(args.argv), kind), kind)
    return 0


def check_split(source: str | Path, world: int) -> None:
    """Raise STSError, before any rank starts, when the local checkpoint at ``source`` cannot be split over ``world``
    ranks (its KV heads or feed-forward width do not divide); hub ids are checked by the ranks as they load."""
    config = read_config(source)
    if config is not None and world > 1:
        Shard(0, world).local_config(config)
