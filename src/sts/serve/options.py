"""``sts serve``: its command-line options and the call that loads the pair and runs the server."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from typing import Any, Iterator

from sts.errors import STSError

log = logging.getLogger(__name__)

#: The default ``--max-request-bytes`` per token of context. In a JSON body a prompt as token ids takes at most 8
#: bytes a token (6 digits for a vocabulary under a million, then ``", "``); as text about 4 in English, and at most
#: about 24 where every character is escaped (``\uXXXX``: 6 bytes a UTF-16 unit, 1 to 2 characters a token).
REQUEST_BYTES_PER_TOKEN = 32
#: What the default ``--max-request-bytes`` allows beyond the prompt: a chat's structure, stop strings, other fields.
REQUEST_BYTES_REST = 1 << 20


def default_max_request_bytes(max_model_len: int) -> int:
    """Return the default largest request body, in bytes, of a server whose context is ``max_model_len`` tokens."""
    return REQUEST_BYTES_PER_TOKEN * max_model_len + REQUEST_BYTES_REST


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Add ``sts serve``'s options: ``sts generate``'s model and method settings, then the server's own."""
    from sts.cli import add_model_args, add_selection_args
    from sts.runner import methods

    add_model_args(p)
    p.add_argument("--method", default=None, choices=methods(),
                   help="decoding method (default: sts with --draft, autoregressive without)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round")
    add_selection_args(p)
    p.add_argument("--seed", type=int, default=0, help="the engine's random generator (sampling)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000,
                   help="port to listen on (default 8000), bound before the models load: one in use is an error at once")
    p.add_argument("--api-key", default=os.environ.get("STS_API_KEY"),
                   help="require Authorization: Bearer KEY on every route but /health (default: $STS_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --target as given)")
    p.add_argument("--slots", type=int, default=4, help="sequences decoded together (continuous batching width)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; past it: 429")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per slot in tokens (default: the models' context, capped so that the KV caches "
                        "take at most half the free GPU memory, a quarter of the free RAM on the CPU)")
    p.add_argument("--max-request-bytes", type=int, default=None, metavar="BYTES",
                   help="a request body past this is refused with 413, read no further (default: "
                        f"{REQUEST_BYTES_PER_TOKEN} bytes per token of --max-model-len plus {REQUEST_BYTES_REST >> 20} "
                        "MiB: a prompt of the whole context fits as token ids, at most 8 bytes each in JSON, or as "
                        "text, about 4 bytes a token in English and about 24 at most with every character escaped)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the target by heads over N processes (cpu: gloo; cuda: NCCL, one GPU each); this one serves")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, open requests may finish for this long, then end with finish_reason "
                        "\"abort\" (a second signal: at once)")


def llm_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Return the :class:`~sts.api.LLM` keyword arguments that ``args`` set (everything but the model paths)."""
    from sts.cli import _options, _prefill, _selection

    args.method = args.method or ("sts" if args.draft else "autoregressive")
    for name, least in (("gamma", 1), ("slots", 1), ("max_queue", 1), ("tensor_parallel", 1)):
        if getattr(args, name) < least:
            raise STSError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise STSError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_request_bytes is not None and args.max_request_bytes < 1:
        raise STSError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise STSError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    _selection(args)  # a dense method's budget, or sink, window and budget together, refused before any model loads
    return dict(method=args.method, budget=args.budget, sink=args.sink, window=args.window,
                dense_layers=args.dense_layers,
                gamma=args.gamma, mapping=args.mapping, draft_budget=args.draft_budget,
                draft_selection=args.draft_selection, prefill=_prefill(args),
                slots=args.slots, max_model_len=args.max_model_len, device=args.device, dtype=args.dtype, seed=args.seed,
                max_queue=args.max_queue, verify=args.verify, tensor_parallel=args.tensor_parallel, **_options(args))


@contextlib.contextmanager
def bound(host: str, port: int) -> Iterator[list[socket.socket]]:
    """Bind ``host:port`` (every address of ``host``) and yield the sockets, closed on exit; raise :class:`STSError`
    when it cannot be bound (in use, no permission, unknown host).

    The server binds before it loads the models (minutes on real weights) and holds the port meanwhile, so a port in
    use is an error at once and no other process can take it while loading. The sockets are bound as uvicorn binds
    its own (asyncio's ``create_server``: ``SO_REUSEADDR``, so that a restart need not wait for the last run's
    connections in TIME_WAIT; IPv6 sockets for IPv6 only) and listen at once: a socket bound with ``SO_REUSEADDR``
    excludes another one (a second ``sts serve`` on the port) only once it listens. A client that connects while
    the models load waits until they have loaded.
    """
    sockets: list[socket.socket] = []
    with contextlib.ExitStack() as closing:
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = closing.enter_context(socket.socket(family, kind, proto))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:  # an address of a family this machine has not enabled: skipped, as asyncio does
                    if exc.errno != errno.EADDRNOTAVAIL:
                        raise
                    continue
                sock.listen()
                sockets.append(sock)
            if not sockets:  # every address skipped
                raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
        except OSError as exc:
            raise STSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        yield sockets


def run_serve(args: argparse.Namespace) -> int:
    """Load the pair and serve it until interrupted; return the exit status."""
    try:
        from sts.serve.app import create_app
        from sts.serve.shutdown import BoundedServer
    except ImportError as exc:
        raise STSError(f"sts serve needs the serve extra: pip install 'sts[serve]' ({exc.name} is missing)") from None
    from sts.api import LLM

    settings = llm_settings(args)  # every option, the port's range among them, before the port and the loading
    if args.api_key is not None and not args.api_key.strip():
        # `--api-key "$UNSET"` would otherwise guard the server with an empty key that a bare "Bearer" header matches.
        raise STSError("--api-key is empty (or STS_API_KEY is set but empty): give a key, or leave both out")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise STSError("--served-model-name is empty: give the model id clients send, or leave it out (--target)")
    with bound(args.host, args.port) as sockets, _terminate_as_exit():  # the port before minutes of loading
        llm = LLM(args.target, args.draft, **settings)
        try:
            name = args.served_model_name or args.target
            slots = llm.engine.slots
            print(f"[sts] serving {name!r} on {args.host}:{args.port} ({llm.method}): {slots} slot{'s' * (slots != 1)} "
                  f"of {llm.max_model_len} tokens each (--slots, --max-model-len)", file=sys.stderr, flush=True)
            if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
                log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
            app = create_app(llm, name, args.api_key, args.max_request_bytes)
            BoundedServer(app, llm.scheduler.cancel_all, args.shutdown_timeout, lambda: llm.scheduler.longest_step_s,
                          host=args.host, port=args.port, log_level=args.log_level).run(sockets)
        finally:
            llm.close()
    return 0


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Make SIGTERM raise SystemExit(0) inside (while loading: the server has its own handler, see
    :class:`~sts.serve.shutdown.BoundedServer`): as an exception it unwinds through the ``finally`` that stops the
    other tensor-parallel ranks."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
