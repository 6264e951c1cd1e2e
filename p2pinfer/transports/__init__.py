"""How the SDK reaches a swarm: :class:`Transport` and the two built in.

A :class:`~p2pinfer.client.Client` turns each of its methods into one
*operation* (a name of :data:`OPS` and its parameters) and hands it to its
transport, which sends it and returns the result in one shape, whatever the
wire: the shape the RPC API answers in (see docs/rpc-api.md). An inference
answer is opened with :meth:`Transport.open_answer` and read as an
:class:`AnswerStream` of text chunks and a trailer.

- :class:`~p2pinfer.transports.libp2p.Libp2pTransport`: a libp2p host of the
  client's own, the swarm found through bootstrap nodes, calls to the nodes
  with the role an operation needs (with failover);
- :class:`~p2pinfer.transports.http.HttpTransport`: the web role's REST API,
  over httpx.

Transports never build the SDK's response classes: the client does, from
the results and chunks. Nothing here imports :mod:`p2pinfer.client`.

Operations and their parameters (the credential each is sent with is in
brackets: *any* is a session token or an API key, *session* a session token,
*none* no credential)::

    embed              {input, model?}                         [any]
    models             {}                                      [any]
    quota              {}                                      [any]
    usage              {since?, until?}                        [any]
    health             {}                                      [none]
    system_health      {}                                      [none]
    register           {username, email, password}             [none]
    login              {password, username | email}            [none]
    refresh            {refresh_token}                         [none]
    logout             {} [session], or {refresh_token} [none]
    logout_everywhere  {}                                      [session]
    change_password    {current_password, new_password}        [session]
    me                 {}                                      [any]
    create_api_key     {name?}                                 [session]
    api_keys           {}                                      [any]
    revoke_api_key     {key_id}                                [session]
    export_data        {user_id?}                              [session]
    erase_account      {user_id?, password?}                   [session]
"""

from __future__ import annotations

import abc
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from ..errors import ConfigError

__all__ = ["OPS", "AnswerStream", "Credential", "Transport", "sole_error", "text_chunk"]

#: Every operation a transport carries (see the module docstring).
OPS: tuple[str, ...] = (
    "embed", "models", "quota", "usage", "health", "system_health",
    "register", "login", "refresh", "logout", "logout_everywhere", "change_password",
    "me", "create_api_key", "api_keys", "revoke_api_key", "export_data", "erase_account",
)


@dataclass(frozen=True)
class Credential:
    """What authenticates a request: a session token or an API key.

    RPC methods take it as a parameter (:meth:`rpc`), the REST API as a
    header (:meth:`headers`).
    """

    kind: Literal["token", "api_key"]
    secret: str = field(repr=False)

    @classmethod
    def session(cls, token: str) -> Credential:
        """A session token (from a login, refresh or password change)."""
        return cls("token", token)

    @classmethod
    def key(cls, api_key: str) -> Credential:
        """An API key (``p2p_...``)."""
        return cls("api_key", api_key)

    def rpc(self) -> dict[str, str]:
        """As RPC methods take it: ``{"token": ...}`` or ``{"api_key": ...}``."""
        return {self.kind: self.secret}

    def headers(self) -> dict[str, str]:
        """As the REST API takes it: ``Authorization: Bearer <token>`` or ``X-API-Key``."""
        if self.kind == "token":
            return {"Authorization": f"Bearer {self.secret}"}
        return {"X-API-Key": self.secret}


def text_chunk(value: Any) -> dict[str, Any]:
    """One chunk of an answer as :class:`AnswerStream` yields it: ``{"delta":
    str}``, with ``"logprobs"`` (a list) when the chunk carries them. A chunk
    that is not a mapping is its own text."""
    if not isinstance(value, dict):
        return {"delta": str(value)}
    out: dict[str, Any] = {"delta": str(value.get("delta", ""))}
    if isinstance(value.get("logprobs"), list):
        out["logprobs"] = value["logprobs"]
    return out


class AnswerStream(abc.ABC):
    """One inference answer as it arrives.

    Iterate for its chunks (see :func:`text_chunk`); once iteration ends,
    :attr:`trailer` holds the answer's final fields (``model``,
    ``finish_reason``, ``usage``, ``request_id``, ``worker``, ...).
    :meth:`aclose` ends the request if it is still running.
    """

    trailer: dict[str, Any] | None = None

    def __aiter__(self) -> Self:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> dict[str, Any]:
        """The next chunk.

        Raises:
            StopAsyncIteration: the answer is complete (:attr:`trailer` is set).
            P2PInferError: the answer failed part way through.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the answer (cancels the request if it is still running)."""


class Transport(abc.ABC):
    """How a :class:`~p2pinfer.client.Client` reaches a swarm.

    Use it as ``async with transport:`` (the client does): entering runs
    :meth:`connect`, which opens what the transport needs and registers its
    closing on the exit stack it is given. A subclass implements
    :meth:`call` and :meth:`open_answer`, and :meth:`peers` if it can list
    the nodes. Errors are :class:`~p2pinfer.errors.P2PInferError`
    subclasses, the same whatever the wire.
    """

    _exit: AsyncExitStack | None = None

    @property
    def is_open(self) -> bool:
        """True between entering and leaving ``async with``."""
        return self._exit is not None

    async def connect(self, stack: AsyncExitStack) -> None:  # noqa: B027 - optional hook
        """Open what the transport needs, closing it through ``stack`` (a
        transport with nothing to open keeps this default)."""

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await self.connect(stack)
        except BaseException as exc:
            try:
                await stack.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseExceptionGroup as group:
                raise (sole_error(group) or group) from None
            raise
        self._exit = stack
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        stack, self._exit = self._exit, None
        if stack is None:
            return None
        try:
            return await stack.__aexit__(*exc)
        except BaseExceptionGroup as group:
            sole = sole_error(group)
            if sole is None:
                raise
            raise sole from None

    @abc.abstractmethod
    async def call(self, op: str, params: dict[str, Any],
                   credential: Credential | None) -> Any:
        """Carry out operation ``op`` (one of :data:`OPS`) and return its
        result in the RPC API's shape.

        Raises:
            UnknownMethod: the transport cannot carry ``op``.
            P2PInferError: the error the swarm answered, or why it is not reachable.
        """

    @abc.abstractmethod
    async def open_answer(self, request: dict[str, Any],
                          credential: Credential) -> AnswerStream:
        """Send an inference request (the ``request`` of
        ``processInferenceRequest``) and return its answer as it arrives."""

    async def peers(self) -> list[dict[str, Any]]:
        """Every node the transport can see, as ``{peer_id, roles, addrs,
        version, models, info}`` dicts.

        Raises:
            ConfigError: the transport cannot list nodes (this default).
        """
        raise ConfigError(f"{type(self).__name__} cannot list peers "
                          "(that needs peer-to-peer access: bootstrap=...)")


def sole_error(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The one exception inside (nested) single-member groups, else None.

    Trio nurseries (py-libp2p's host runs in one) wrap whatever leaves them
    in an ``ExceptionGroup``; a caller of the SDK should see the error itself.
    """
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
