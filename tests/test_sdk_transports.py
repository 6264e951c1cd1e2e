"""The SDK's transports (p2pinfer.transports) without a swarm.

- the client, the sync client and the transports import each other without
  a cycle, and no transport imports the client (checked on the source);
- :class:`HttpTransport` sends each operation to its REST route: method,
  path, query, body and credential header, against ``httpx.MockTransport``;
- :class:`Libp2pTransport` sends each operation's RPC method the parameters
  the nodes take, credential included;
- a :class:`Transport` of one's own, passed as ``Client(transport=...)``,
  receives every call and answer of the client.

tests/test_sdk.py covers both built-in transports against real nodes.
"""

from __future__ import annotations

import ast
import json
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2pinfer import errors
from p2pinfer.client import Client, EmbeddingResponse
from p2pinfer.transports import OPS, AnswerStream, Credential, Transport
from p2pinfer.transports.http import HttpTransport
from p2pinfer.transports.libp2p import Libp2pTransport

PACKAGE = Path(__file__).resolve().parents[1] / "p2pinfer"
KEY = Credential.key("p2p_key")
SESSION = Credential.session("tok")


# -- imports ------------------------------------------------------------------------------------
def sdk_sources() -> dict[str, str]:
    """The SDK modules (client, sync client, transports) by dotted name."""
    paths = [PACKAGE / "client.py", PACKAGE / "sync_client.py",
             *sorted((PACKAGE / "transports").glob("*.py"))]
    out = {}
    for path in paths:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path.read_text()
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not those inside
    functions, nor under ``if TYPE_CHECKING``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody,
                              *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.ClassDef | ast.With):
                visit(node.body)

    visit(tree.body)
    return found


def imported_modules(name: str, is_package: bool,
                     node: ast.Import | ast.ImportFrom) -> set[str]:
    """The dotted modules ``node`` (in module ``name``) may import, with
    their parent packages (importing a module runs its packages first)."""
    targets: set[str] = set()
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, *([node.module] if node.module else [])])
        targets = {base, *(f"{base}.{alias.name}" for alias in node.names)}
    out = set()
    for target in targets:
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def import_graph(sources: dict[str, str], *, everything: bool = False
                 ) -> dict[str, set[str]]:
    """Which of ``sources`` each of them imports (module level only, unless
    ``everything``)."""
    graph: dict[str, set[str]] = {}
    for name, text in sources.items():
        tree = ast.parse(text)
        is_package = any(other.startswith(name + ".") for other in sources)
        nodes = ([n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
                 if everything else module_level_imports(tree))
        graph[name] = {m for n in nodes for m in imported_modules(name, is_package, n)
                       if m in sources and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (its modules in order, the first repeated), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_checker_finds_a_cycle_and_ignores_lazy_imports() -> None:
    sources = {
        "pkg": "",
        "pkg.a": "from .b import B\n",
        "pkg.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"
                 "def later():\n    from . import a\n",
        "pkg.c": "from pkg import d\n",
        "pkg.d": "import pkg.c\n",
    }
    graph = import_graph(sources)
    assert graph["pkg.a"] == {"pkg", "pkg.b"} and graph["pkg.b"] == set()
    assert find_cycle(graph) == ["pkg.c", "pkg.d", "pkg.c"]
    assert "pkg.a" in import_graph(sources, everything=True)["pkg.b"]


def test_the_sdk_modules_import_each_other_without_a_cycle() -> None:
    sources = sdk_sources()
    assert {"p2pinfer.client", "p2pinfer.sync_client", "p2pinfer.transports",
            "p2pinfer.transports.http", "p2pinfer.transports.libp2p"} <= set(sources)
    graph = import_graph(sources)
    assert find_cycle(graph) is None
    assert "p2pinfer.client" in graph["p2pinfer.sync_client"]  # built on the client
    # the transports know nothing of the client, not even for type checking
    everything = import_graph(sources, everything=True)
    for name, imports in everything.items():
        if name.startswith("p2pinfer.transports"):
            assert not imports & {"p2pinfer.client", "p2pinfer.sync_client"}, name


# -- HttpTransport ------------------------------------------------------------------------------
@dataclass
class Route:
    """One operation and the request it must become."""

    op: str
    params: dict[str, Any]
    credential: Credential | None
    method: str
    path: str
    query: dict[str, str] | None = None
    body: dict[str, Any] | None = None   # None: no body at all


HTTP_CASES = [
    Route("embed", {"input": ["a cat"], "model": "mini"}, KEY, "POST", "/v1/embeddings",
          body={"input": ["a cat"], "model": "mini"}),
    Route("models", {}, KEY, "GET", "/api/models"),
    Route("quota", {}, SESSION, "GET", "/api/quota"),
    Route("usage", {}, KEY, "GET", "/api/usage"),
    Route("usage", {"since": "2025-01-01", "until": "2025-01-31"}, KEY, "GET", "/api/usage",
          query={"since": "2025-01-01", "until": "2025-01-31"}),
    Route("health", {}, None, "GET", "/api/health"),
    Route("register", {"username": "ann", "email": "ann@example.org", "password": "pw"}, None,
          "POST", "/api/auth/register",
          body={"username": "ann", "email": "ann@example.org", "password": "pw"}),
    Route("login", {"password": "pw", "email": "ann@example.org"}, None,
          "POST", "/api/auth/login", body={"password": "pw", "email": "ann@example.org"}),
    Route("refresh", {"refresh_token": "r1"}, None, "POST", "/api/auth/refresh",
          body={"refresh_token": "r1"}),
    Route("logout", {}, SESSION, "POST", "/api/auth/logout"),
    Route("logout", {"refresh_token": "r1"}, None, "POST", "/api/auth/logout",
          body={"refresh_token": "r1"}),
    Route("logout_everywhere", {}, SESSION, "POST", "/api/auth/logout-all"),
    Route("change_password", {"current_password": "a", "new_password": "b"}, SESSION,
          "POST", "/api/auth/password", body={"current_password": "a", "new_password": "b"}),
    Route("me", {}, KEY, "GET", "/api/auth/me"),
    Route("create_api_key", {}, SESSION, "POST", "/api/auth/api-keys", body={}),
    Route("create_api_key", {"name": "ci"}, SESSION, "POST", "/api/auth/api-keys",
          body={"name": "ci"}),
    Route("api_keys", {}, SESSION, "GET", "/api/auth/api-keys"),
    Route("revoke_api_key", {"key_id": "k-1"}, SESSION, "DELETE", "/api/auth/api-keys/k-1"),
    Route("export_data", {}, SESSION, "GET", "/api/auth/export"),
    Route("export_data", {"user_id": "u-2"}, SESSION, "GET", "/api/auth/export",
          query={"user_id": "u-2"}),
    Route("erase_account", {"password": "pw"}, SESSION, "DELETE", "/api/auth/me",
          body={"password": "pw"}),
    Route("erase_account", {"user_id": "u-2", "password": "pw"}, SESSION,
          "DELETE", "/api/auth/users/u-2"),
]


def recording_server(seen: list[httpx.Request]) -> httpx.MockTransport:
    """A fake web node: records each request and answers in the REST API's shapes."""
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/embeddings":
            return httpx.Response(200, json={
                "object": "list", "model": "mini", "request_id": "req-1",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
                "usage": {"prompt_tokens": 2, "total_tokens": 2}})
        if request.url.path == "/api/inference":
            body = json.loads(request.content)
            lines = [{"delta": "Hel"}, {"delta": "lo", "logprobs": [{"token": "lo"}]},
                     {"done": True, "model": body.get("model"), "finish_reason": "stop",
                      "usage": {"completion_tokens": 2}}]
            return httpx.Response(200, content="\n".join(json.dumps(x) for x in lines) + "\n",
                                  headers={"content-type": "application/x-ndjson"})
        return httpx.Response(200, json={"path": request.url.path})

    return httpx.MockTransport(handler)


def credential_headers(request: httpx.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items()
            if k in ("authorization", "x-api-key")}


async def test_every_operation_takes_its_rest_route() -> None:
    assert {case.op for case in HTTP_CASES} | {"system_health"} == set(OPS)
    seen: list[httpx.Request] = []
    async with HttpTransport("http://web.test/", transport=recording_server(seen)) as http:
        for case in HTTP_CASES:
            result = await http.call(case.op, dict(case.params), case.credential)
            request = seen.pop()
            label = f"{case.op} {case.params}"
            assert (request.method, request.url.path) == (case.method, case.path), label
            assert dict(request.url.params) == (case.query or {}), label
            expected = {k.lower(): v for k, v in case.credential.headers().items()} \
                if case.credential else {}
            assert credential_headers(request) == expected, label
            if case.body is None:
                assert request.content == b"", label
            else:
                assert request.headers["content-type"] == "application/json", label
                assert json.loads(request.content) == case.body, label
            if case.op == "embed":  # in the RPC API's shape
                assert result == {"embeddings": [[0.6, 0.8]], "model": "mini",
                                  "usage": {"prompt_tokens": 2, "total_tokens": 2},
                                  "request_id": "req-1"}
            else:
                assert result == {"path": case.path}
        with pytest.raises(errors.UnknownMethod, match="gateway's health only"):
            await http.call("system_health", {}, None)
        with pytest.raises(errors.UnknownMethod):
            await http.call("no_such_op", {}, None)
        with pytest.raises(errors.InvalidParams):
            await http.call("revoke_api_key", {}, SESSION)
        with pytest.raises(errors.ConfigError, match="peer-to-peer"):
            await http.peers()
        assert seen == []  # none of those was sent


async def test_an_http_answer_streams_chunks_then_the_trailer() -> None:
    seen: list[httpx.Request] = []
    async with HttpTransport("http://web.test", transport=recording_server(seen)) as http:
        answer = await http.open_answer({"prompt": "Hi", "model": "m", "stream": False}, KEY)
        try:
            chunks = [chunk async for chunk in answer]
        finally:
            await answer.aclose()
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/api/inference")
    assert credential_headers(request) == {"x-api-key": "p2p_key"}
    assert json.loads(request.content) == {"prompt": "Hi", "model": "m", "stream": True}
    assert chunks == [{"delta": "Hel"}, {"delta": "lo", "logprobs": [{"token": "lo"}]}]
    assert answer.trailer is not None and answer.trailer["finish_reason"] == "stop"


async def test_http_answer_errors_keep_their_class() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["prompt"] == "refused":
            return httpx.Response(404, json={"error": {
                "code": 1701, "type": "UnknownModel", "message": "no such model"}})
        lines = [{"delta": "a"}, {"error": {"code": 1706, "message": "no worker"}}]
        return httpx.Response(200, content="\n".join(json.dumps(x) for x in lines))

    async with HttpTransport("http://web.test",
                             transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(errors.UnknownModel) as info:
            await http.open_answer({"prompt": "refused"}, KEY)
        assert info.value.data["http_status"] == 404
        answer = await http.open_answer({"prompt": "cut"}, KEY)
        assert await answer.__anext__() == {"delta": "a"}
        with pytest.raises(errors.NoWorkerAvailable):
            await answer.__anext__()
        await answer.aclose()


def test_a_credential_goes_where_each_api_takes_it() -> None:
    assert KEY.rpc() == {"api_key": "p2p_key"} and SESSION.rpc() == {"token": "tok"}
    assert KEY.headers() == {"X-API-Key": "p2p_key"}
    assert SESSION.headers() == {"Authorization": "Bearer tok"}
    assert "p2p_key" not in repr(KEY)  # secrets stay out of logs


# -- Libp2pTransport ----------------------------------------------------------------------------
RPC_CASES: list[tuple[str, dict[str, Any], Credential | None, str, str, Any]] = [
    ("embed", {"input": "x", "model": "mini"}, KEY, "gateway", "processEmbeddingRequest",
     {"request": {"input": "x", "model": "mini"}, "auth": {"api_key": "p2p_key"}}),
    ("models", {}, KEY, "gateway", "listModels", {"auth": {"api_key": "p2p_key"}}),
    ("quota", {}, SESSION, "gateway", "getUserQuota", {"auth": {"token": "tok"}}),
    ("usage", {"since": "2025-01-01"}, KEY, "gateway", "getUsage",
     {"auth": {"api_key": "p2p_key"}, "since": "2025-01-01"}),
    ("health", {}, None, "gateway", "getServiceHealth", {}),
    ("system_health", {}, None, "metrics", "getSystemHealth", None),
    ("register", {"username": "ann", "email": "e", "password": "pw"}, None, "auth",
     "registerUser", {"username": "ann", "email": "e", "password": "pw"}),
    ("login", {"password": "pw", "username": "ann"}, None, "auth", "loginUser",
     {"password": "pw", "username": "ann"}),
    ("refresh", {"refresh_token": "r1"}, None, "auth", "refreshToken", {"refresh_token": "r1"}),
    ("logout", {}, SESSION, "auth", "logoutUser", {"token": "tok"}),
    ("logout", {"refresh_token": "r1"}, None, "auth", "logoutUser", {"refresh_token": "r1"}),
    ("logout_everywhere", {}, SESSION, "auth", "logoutEverywhere", {"token": "tok"}),
    ("change_password", {"current_password": "a", "new_password": "b"}, SESSION, "auth",
     "changePassword", {"token": "tok", "current_password": "a", "new_password": "b"}),
    ("me", {}, KEY, "auth", "getUser", {"api_key": "p2p_key"}),
    ("me", {}, SESSION, "auth", "getUser", {"token": "tok"}),
    ("create_api_key", {"name": "ci"}, SESSION, "auth", "generateApiKey",
     {"token": "tok", "name": "ci"}),
    ("api_keys", {}, KEY, "auth", "listApiKeys", {"api_key": "p2p_key"}),
    ("revoke_api_key", {"key_id": "k-1"}, SESSION, "auth", "revokeApiKey",
     {"token": "tok", "key_id": "k-1"}),
    ("export_data", {"user_id": "u-2"}, SESSION, "auth", "exportUserData",
     {"token": "tok", "user_id": "u-2"}),
    ("erase_account", {"user_id": "u-2", "password": "pw"}, SESSION, "auth", "eraseUser",
     {"token": "tok", "user_id": "u-2", "password": "pw"}),
]


async def test_every_operation_calls_its_rpc_method(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {case[0] for case in RPC_CASES} == set(OPS)
    p2p = Libp2pTransport(["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWabc"])
    calls: list[tuple[str, str, Any]] = []

    async def call_role(role: str, method: str, params: Any) -> Any:
        calls.append((role, method, params))
        return {"ok": True}

    monkeypatch.setattr(p2p, "_call_role", call_role)
    for op, params, credential, role, method, sent in RPC_CASES:
        assert await p2p.call(op, dict(params), credential) == {"ok": True}
        got = calls.pop()
        assert got == (role, method, sent), op
        if isinstance(sent, dict):
            assert list(got[2]) == list(sent), op  # in the same order
    with pytest.raises(errors.AuthenticationRequired):  # a session-only method
        await p2p.call("revoke_api_key", {"key_id": "k-1"}, KEY)
    with pytest.raises(errors.UnknownMethod):
        await p2p.call("no_such_op", {}, None)
    assert calls == []
    with pytest.raises(errors.ConfigError):
        Libp2pTransport([])


# -- a transport of one's own -------------------------------------------------------------------
class ScriptedAnswer(AnswerStream):
    def __init__(self, chunks: list[dict[str, Any]], trailer: dict[str, Any]) -> None:
        self._chunks = list(chunks)
        self._trailer = trailer
        self.closed = False

    async def __anext__(self) -> dict[str, Any]:
        if not self._chunks:
            self.trailer = self._trailer
            raise StopAsyncIteration
        return self._chunks.pop(0)

    async def aclose(self) -> None:
        self.closed = True


class RecordingTransport(Transport):
    """Answers every operation from a table and records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], Credential | None]] = []
        self.requests: list[tuple[dict[str, Any], Credential]] = []
        self.answers: list[ScriptedAnswer] = []
        self.connected = self.closed = False

    async def connect(self, stack: AsyncExitStack) -> None:
        self.connected = True
        stack.callback(setattr, self, "closed", True)

    async def call(self, op: str, params: dict[str, Any],
                   credential: Credential | None) -> Any:
        self.calls.append((op, params, credential))
        if op in ("login", "refresh", "change_password"):
            return {"token": f"session-{len(self.calls)}"}
        if op == "embed":
            return {"embeddings": [[1.0, 0.0]], "model": "mini", "usage": {"total_tokens": 1},
                    "request_id": "req-e", "worker": "w-1"}
        return {"models": [{"name": "m", "status": "loaded", "workers": 1}], "keys": [],
                "usage": [], "op": op}

    async def open_answer(self, request: dict[str, Any],
                          credential: Credential) -> AnswerStream:
        self.requests.append((request, credential))
        answer = ScriptedAnswer(
            [{"delta": "Hi"}, {"delta": "!", "logprobs": [{"token": "!", "logprob": -0.1}]}],
            {"model": "m", "finish_reason": "stop", "usage": {"completion_tokens": 2},
             "request_id": "req-i", "worker": "w-2"})
        self.answers.append(answer)
        return answer


async def test_a_transport_of_ones_own_gets_every_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("P2PINFER_BOOTSTRAP", "P2PINFER_URL", "P2PINFER_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    transport = RecordingTransport()
    client = Client(transport=transport, api_key="p2p_key")  # no address needed
    assert not client.is_http and client.transport is transport
    with pytest.raises(RuntimeError):
        await client.models()
    async with client:
        assert transport.connected and not transport.closed
        assert (await client.models())[0]["name"] == "m"
        assert transport.calls[-1] == ("models", {}, KEY)
        embedded = await client.embed("a cat", model="mini")
        assert embedded == EmbeddingResponse(vectors=[[1.0, 0.0]], model="mini",
                                             usage={"total_tokens": 1}, request_id="req-e",
                                             worker="w-1")
        assert transport.calls[-1] == ("embed", {"input": "a cat", "model": "mini"}, KEY)
        assert (await client.usage(since="2025-01-01")) == []
        assert transport.calls[-1] == ("usage", {"since": "2025-01-01"}, KEY)
        await client.health()
        assert transport.calls[-1] == ("health", {}, None)

        answer = await client.inference("Hello", model="m", logprobs=True)
        request, credential = transport.requests[-1]
        assert request == {"prompt": "Hello", "model": "m", "stream": False, "logprobs": True}
        assert credential == KEY and transport.answers[-1].closed
        assert (answer.text, answer.finish_reason, answer.worker) == ("Hi!", "stop", "w-2")
        assert answer.usage == {"completion_tokens": 2}
        assert answer.logprobs == [{"token": "!", "logprob": -0.1}]
        async with client.stream(messages=[{"role": "user", "content": "Hey"}]) as stream:
            assert [text async for text in stream] == ["Hi", "!"]
        assert stream.response is not None and stream.response.request_id == "req-i"

        with pytest.raises(errors.AuthenticationRequired):  # sessions only
            await client.create_api_key("ci")
        await client.login("ann", password="pw")
        assert transport.calls[-1] == ("login", {"password": "pw", "username": "ann"}, None)
        session = Credential.session(client.token or "")
        await client.create_api_key("ci")
        assert transport.calls[-1] == ("create_api_key", {"name": "ci"}, session)
        await client.me()  # the session wins over the API key
        assert transport.calls[-1] == ("me", {}, session)
        await client.erase_account("pw")
        assert transport.calls[-1] == ("erase_account", {"password": "pw"}, session)
        await client.logout()
        assert transport.calls[-1] == ("logout", {}, session) and client.token is None
        await client.logout(refresh_token="r1")
        assert transport.calls[-1] == ("logout", {"refresh_token": "r1"}, None)

        with pytest.raises(errors.ConfigError):
            await client.peers()  # the default: this transport lists no nodes
        with pytest.raises(errors.ConfigError):
            await client.find("gateway")
    assert transport.closed


def test_the_default_transport_follows_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("P2PINFER_BOOTSTRAP", "P2PINFER_URL", "P2PINFER_NETWORK"):
        monkeypatch.delenv(name, raising=False)
    mock = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    over_http = Client(base_url="http://web.test", transport=mock)
    assert over_http.is_http and over_http.transport is mock
    assert over_http.network is None and over_http.untrusted == {}
    p2p = Client(bootstrap=["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWabc"], network="p2p-abc")
    assert not p2p.is_http and p2p.network == "p2p-abc" and p2p._rpc is None
    p2p.network = "p2p-other"  # still an attribute one may set
    assert p2p.network == "p2p-other"
