"""LangChain against a p2pinfer node, as agent and RAG code uses it.

``langchain-openai`` and ``langchain-ollama`` send their own shapes of what
the dialect tests send by hand: ``bind_tools`` (tools with ``strict``,
``tool_choice`` by name, ``parallel_tool_calls``), ``with_structured_output``
(a strict ``json_schema``), streaming with usage, and embeddings of
documents and queries. One node serves the embedded SmolLM2 and
all-MiniLM-L6-v2; the packages are synchronous, so they run in a thread.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pydantic
import trio
from langchain_core.tools import tool
from langchain_ollama import ChatOllama, OllamaEmbeddings
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from .test_web_support import web_swarm


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny in {city}."


class City(pydantic.BaseModel):
    """A city and the country it is in."""

    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)


async def test_langchain_chat_tools_structured_output_and_embeddings(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(300):
        async with web_swarm(nursery, tmp_path, models=None) as swarm:
            alice = await swarm.account("alice")
            headers = {"Authorization": f"Bearer {alice.api_key}"}

            def session() -> dict[str, Any]:
                chat = ChatOpenAI(base_url=f"{swarm.url}/v1", api_key=alice.api_key,
                                  model="smollm2", temperature=0, max_tokens=120,
                                  max_retries=0, timeout=60)
                ollama_chat = ChatOllama(base_url=swarm.url, model="smollm2", temperature=0,
                                         num_predict=120, client_kwargs={"headers": headers})
                out: dict[str, Any] = {}
                out["tools"] = chat.bind_tools([get_weather], tool_choice="get_weather",
                                               strict=True).invoke("Weather in Oslo?")
                out["structured"] = chat.with_structured_output(City).invoke(
                    "Name a city in France.")
                parts = list(chat.stream("Say hello.", stream_usage=True))
                out["streamed"] = parts
                out["ollama_tools"] = ollama_chat.bind_tools([get_weather]).invoke(
                    "Call get_weather for Paris.")
                out["documents"] = OpenAIEmbeddings(
                    base_url=f"{swarm.url}/v1", api_key=alice.api_key, model="all-minilm",
                    check_embedding_ctx_length=False,  # it would fetch OpenAI's tokenizer
                ).embed_documents(["The cat sits on the mat.", "Markets fell today."])
                out["query"] = OllamaEmbeddings(
                    base_url=swarm.url, model="all-minilm",
                    client_kwargs={"headers": headers}).embed_query("A kitten on a rug.")
                return out

            got = await trio.to_thread.run_sync(session)

    (call,) = got["tools"].tool_calls[:1]
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    assert get_weather.invoke(call["args"]).startswith("It is sunny")
    city = got["structured"]
    assert isinstance(city, City) and city.name and city.country
    streamed = got["streamed"]
    assert "".join(str(p.content) for p in streamed)
    assert sum((p.usage_metadata or {}).get("output_tokens", 0) for p in streamed) > 0
    ollama_calls = got["ollama_tools"].tool_calls
    assert ollama_calls and ollama_calls[0]["name"] == "get_weather"
    cat, market = got["documents"]
    query = got["query"]
    assert len(cat) == len(query) == 384

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b))

    assert cos(query, cat) > cos(query, market)
