"""The OpenAI wire format: request bodies (pydantic, strict types), responses, stream chunks and error bodies.

Fields sts does not implement are refused when set to anything but their neutral value (so a
client never silently gets something else than it asked for); unknown fields are ignored.
``max_tokens`` defaults as OpenAI's: 16 for a completion, the rest of the context for a chat (an
explicit null: the rest of the context for both).
Extra fields beyond OpenAI's: ``top_k``; ``return_token_ids`` (as vLLM: the response's choice, and
each stream chunk's, carries ``token_ids``, and the response ``prompt_token_ids``); ``ignore_eos``
(as vLLM: decode past end-of-sequence ids up to ``max_tokens``); ``budget``, this request's selection
budget (rows per KV head, or a fraction of its context, as ``--budget``; the request then reads
what it would alone at that budget, see :meth:`sts.engine.Engine.prefill`); and the server's other
method settings (``method``, ``gamma``, ``sink``, ``window``, ``dense_layers``, ``draft_budget``,
``draft_selection``) and its selection policy's options (:data:`POLICY_OPTIONS`: ``rerank``,
``rerank_prob``, ``feedback``, ``head_budgets``, ... as the selection policies' constructors name them),
which are accepted only with the server's own values: each is fixed when the engine is built (one
engine per server, whose shapes and CUDA graphs every slot shares), so a request cannot change it.
``draft_budget`` takes ``--draft-budget``'s values (a row count, "auto" or "dense": a dense draft, null in
``/v1/models``); a policy option the server's method does not take is refused whatever its value.
"""

from __future__ import annotations

import inspect
import time
import uuid
from typing import Any, Literal, Mapping

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, field_validator, model_validator,
)

from sts.errors import STSError
from sts.runner import DraftBudget, draft_settings
from sts.selection import REGISTRY, SelectionConfig, check_options

#: The server's method settings: fixed when its engine is built, so a request may only repeat the server's values.
FIXED_SETTINGS = ("method", "gamma", "sink", "window", "dense_layers", "draft_budget", "draft_selection")


def _takes(method: str, name: str) -> bool:
    """Return whether selection policy ``method`` takes the option ``name`` (:func:`~sts.selection.check_options`)."""
    try:
        check_options(method, [name])
    except STSError:
        return False
    return True


def policy_settings(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Return the options the selection policy of ``method`` runs with, by name: ``options`` as the engine was given
    them, else the defaults of the policy's constructor ({} for a method without a policy, e.g. ``speculative``)."""
    if method not in REGISTRY:
        return {}
    params = inspect.signature(REGISTRY[method].__init__).parameters.values()
    return {p.name: options.get(p.name, p.default) for p in params if _takes(method, p.name)}


#: Every option of every selection policy (``rerank``, ``feedback``, ``page_size``, ...): like the method settings, each
#: is fixed when the server's engine is built.
POLICY_OPTIONS = tuple(dict.fromkeys(name for method in REGISTRY for name in policy_settings(method, {})))


class APIError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        """Return the JSON body."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Return OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    """Fields both endpoints take (other fields are kept aside, unvalidated: :meth:`policy_options` reads them)."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False
    ignore_eos: bool = False
    # This request's budget, then the server's method settings: accepted only as the server has them (see the
    # module docstring).
    budget: float | None = None
    method: str | None = None
    gamma: int | None = None
    sink: int | None = None
    window: int | None = None
    dense_layers: int | None = None
    draft_budget: DraftBudget = None
    draft_selection: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """Read a null as the field's default, as OpenAI types these fields ("... or null"): ``"n": null`` is n 1.
        ``max_tokens`` keeps its own null: no limit but the context (documented, as vLLM)."""
        if not isinstance(data, dict):
            return data
        defaulted = {name for name, field in cls.model_fields.items() if field.default is not None} - {"max_tokens"}
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}

    @field_validator("draft_budget", mode="wrap")
    @classmethod
    def _one_draft_budget_error(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Say what ``draft_budget`` takes in one error (not one per kind of value it takes)."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"a row count, 'auto' or 'dense' (as --draft-budget), got {value!r}") from None

    def policy_options(self) -> dict[str, Any]:
        """Return the selection policy options (:data:`POLICY_OPTIONS`) the request sets, by name (null: unset)."""
        extra = self.model_extra or {}
        return {name: extra[name] for name in POLICY_OPTIONS if extra.get(name) is not None}

    def unsupported(self) -> list[tuple[str, bool]]:
        """Return (field, whether it asks for something sts does not do) pairs, checked by :func:`check_body`."""
        return [("presence_penalty", self.presence_penalty != 0), ("frequency_penalty", self.frequency_penalty != 0),
                ("logit_bias", bool(self.logit_bias))]

    def settable(self) -> list[str]:
        """Return the fields a request of this kind may set to a value of its own, in their order: every optional one
        but the method settings (:data:`FIXED_SETTINGS`) and those :meth:`unsupported` names."""
        refused = set(FIXED_SETTINGS) | {name for name, _ in self.unsupported()}
        fields = type(self).model_fields
        return [name for name, field in fields.items() if not field.is_required() and name not in refused]

    @property
    def include_usage(self) -> bool:
        """Return whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Body):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        return super().unsupported() + [("echo", self.echo), ("best_of", (self.best_of or 1) != 1),
                                        ("logprobs", self.logprobs is not None), ("suffix", bool(self.suffix))]


class ContentPart(BaseModel):
    """A part of a message's content; only text parts are read."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        """Refuse a message without content but an assistant's (whose content OpenAI lets be null, e.g. beside tool
        calls)."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def template_input(self, index: int) -> dict[str, Any]:
        """Return the message as the chat template reads it (text parts joined); raise :class:`APIError` for other parts."""
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIError(400, "only text content parts are supported", f"messages.{index}.content")
            content = "".join(p.text or "" for p in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(_Body):
    """``POST /v1/chat/completions``: a conversation, rendered with the target tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, bool]]:
        fmt = (self.response_format or {}).get("type", "text")
        return super().unsupported() + [("logprobs", self.logprobs), ("top_logprobs", self.top_logprobs is not None),
                                        ("tools", bool(self.tools)), ("response_format", fmt != "text")]


def check_body(body: _Body, settings: dict[str, Any]) -> None:
    """Refuse (:class:`APIError` 400) ``n > 1``, unsupported fields, an impossible budget (e.g. below sink + window),
    and method settings or selection policy options other than the server's ``settings`` (all but ``budget``, which
    a request may set).

    ``settings``: the server's values by field name (``method``, ``gamma``, ``budget``, ``sink``, ``window``,
    ``dense_layers``, ``draft_budget``, ``draft_selection``, and its policy's options, :func:`policy_settings`).
    Whether the server's method can give a request a budget of its own is the engine's to say
    (:meth:`sts.api.LLM.params`).
    """
    if body.n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", "n")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options applies to streamed replies: set stream to true, or leave it out",
                       "stream_options")
    for name, asked in body.unsupported():
        if asked:
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported_parameter")
    selection = {k: getattr(body, k) for k in ("budget", "sink", "window", "dense_layers") if getattr(body, k) is not None}
    if selection and settings["budget"] is None:
        raise APIError(400, f"{next(iter(selection))} applies to selection methods; this server decodes with "
                            f"{settings['method']}, which reads every row", next(iter(selection)), "unsupported_parameter")
    if selection:
        try:
            SelectionConfig(**{k: settings[k] for k in ("budget", "sink", "window", "dense_layers")} | selection)
        except STSError as exc:
            raise APIError(400, f"invalid selection settings: {exc}", next(iter(selection)), "invalid_value") from None
    if body.method is not None and body.method != settings["method"]:
        raise APIError(400, f"this server decodes with method {settings['method']!r}: one engine per server, start another "
                            f"server for method {body.method!r}", "method", "unsupported_override")
    asked = {name: getattr(body, name) for name in FIXED_SETTINGS[1:]} | body.policy_options()  # the method: above
    for name, value in asked.items():
        if value is not None and not _same_as_server(name, value, settings):
            if name not in settings:
                server = f"this server's method {settings['method']} takes no {name}"
            else:  # the server's value as a request would give it (a dense draft: null in /v1/models)
                shown = "dense" if name == "draft_budget" and settings[name] is None else settings[name]
                server = f"this server: {name}={shown}"
            raise APIError(400, f"{name} is fixed when the server starts ({server}); a request may set only "
                                f"{', '.join(body.settable())}", name, "unsupported_override")


def _same_as_server(name: str, value: Any, settings: dict[str, Any]) -> bool:
    """Return whether a request's ``value`` of the fixed setting or policy option ``name`` is the server's: the same
    after "auto"/"dense" are resolved for the server's method (``draft_budget``), JSON lists read as tuples, and
    a JSON true or false not taken for 1 or 0."""
    if name not in settings:  # an option of another method's policy
        return False
    server = settings[name]
    if name == "draft_budget":
        try:
            value = draft_settings(settings["method"], value, None)[0]
        except STSError:  # e.g. a row count for autoregressive decoding: not the server's
            return False
    value, server = (tuple(x) if isinstance(x, list) else x for x in (value, server))
    return isinstance(value, bool) == isinstance(server, bool) and value == server


class Reply:
    """Builds one request's response objects: the whole response, or its stream chunks (OpenAI's shapes)."""

    def __init__(self, kind: Literal["completion", "chat"], model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _choice(self, text: str | None, finish_reason: str | None, chunk: bool, token_ids: list[int] | None) -> dict[str, Any]:
        if self.kind == "completion":
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        elif chunk:
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            message = {"role": "assistant", "content": text or ""}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return choice

    def _object(self, chunk: bool) -> str:
        if self.kind == "completion":
            return "text_completion"
        return "chat.completion.chunk" if chunk else "chat.completion"

    def full(
        self, text: str, finish_reason: str, usage: dict[str, int], stats: dict[str, Any],
        token_ids: list[int] | None = None, prompt_token_ids: list[int] | None = None,
    ) -> dict[str, Any]:
        """Return the response to a request without ``stream`` (``stats``: sts's own numbers, under ``"sts"``;
        the ids only when asked for)."""
        out = {"id": self.id, "object": self._object(False), "created": self.created, "model": self.model,
               "choices": [self._choice(text, finish_reason, False, token_ids)], "usage": usage, "sts": stats}
        if prompt_token_ids is not None:
            out["prompt_token_ids"] = prompt_token_ids
        return out

    def chunk(
        self, text: str | None, finish_reason: str | None = None, role: bool = False, token_ids: list[int] | None = None,
    ) -> dict[str, Any]:
        """Return one stream chunk with ``text`` (``role``: the chat stream's opening chunk)."""
        out = {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model,
               "choices": [self._choice(text, finish_reason, True, token_ids)]}
        if role:
            out["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """Return the stream's closing usage chunk (``stream_options.include_usage``)."""
        return {"id": self.id, "object": self._object(True), "created": self.created, "model": self.model,
                "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Return OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
