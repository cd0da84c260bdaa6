"""A built-in, OpenAI-compatible chat model that streams scripted text over real HTTP.

It lets the very same ``ChatOpenAI`` and ``openai.AsyncOpenAI`` code run with no API key: the
worker starts one on loopback when neither ``OPENAI_API_KEY`` nor ``OPENAI_BASE_URL`` is set.
It speaks just enough HTTP/1.1 (keep-alive, chunked server-sent events) for those clients:
``POST /v1/chat/completions`` (streaming or not, ``stream_options.include_usage``) and
``GET /v1/models``. Faults can be scripted for tests: a prompt containing a fault's ``match``
text gets an HTTP 500, an in-stream error, a dropped connection, a stall after N tokens, or a
hold after N tokens until the server's ``released`` event is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

logger = logging.getLogger(__name__)

JOKE = "Why was the {topic} sitting on the computer?\n\nBecause it wanted to keep an eye on the mouse!"
POEM = (
    "In sunlit patches, sleek and sly,\n"
    "Whiskers twitch as shadows fly.\n"
    "With velvet paws and eyes so bright,\n"
    "They dance through dreams, both day and night.\n\n"
    "A playful pounce, a gentle purr,\n"
    "In every leap, a soft allure.\n"
    "Curled in warmth, a silent grace,\n"
    "Each furry friend, a warm embrace."
)
DEFAULT = "This is the tokenbus offline model. Set OPENAI_BASE_URL or OPENAI_API_KEY for a real one."

_TOKEN_RE = re.compile(r" ?[A-Za-z]+|'[a-z]+| ?\d+| ?[^\sA-Za-z\d]|\s+")
_TOPIC_RE = re.compile(r"about (?:a |an |the )?([\w -]{1,40}?)[.?!]*$")


def tokenize(text: str) -> list[str]:
    """Split text into word-like tokens the way BPE models tend to ("Why", " was", "?", "\\n\\n")."""
    tokens = _TOKEN_RE.findall(text)
    assert "".join(tokens) == text, "tokenizer must cover the whole text"
    return tokens


def script_for(prompt: str) -> str:
    """The text the offline model answers ``prompt`` with."""
    match = _TOPIC_RE.search(prompt.strip())
    topic = match.group(1).strip() if match else "cat"
    singular = topic[:-1] if topic.endswith("s") and len(topic) > 3 else topic
    lowered = prompt.lower()
    if "joke" in lowered:
        return JOKE.format(topic=singular)
    if "poem" in lowered:
        return POEM
    return DEFAULT


@dataclass(frozen=True)
class Fault:
    """Misbehave for prompts containing ``match``: after ``after`` tokens, fail the way ``kind`` says;
    for the first ``times`` such requests only (None: every one)."""

    match: str
    kind: Literal["status", "error", "disconnect", "stall", "hold"]
    after: int = 0
    times: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """``match:kind[:after]``, e.g. ``explode:error:5``."""
        match, kind, *rest = spec.split(":")
        if kind not in ("status", "error", "disconnect", "stall", "hold"):
            raise ValueError(f"fault kind must be status, error, disconnect, stall or hold, not {kind!r}")
        return cls(match, kind, int(rest[0]) if rest else 0)  # type: ignore[arg-type]


class _BadRequest(Exception):
    pass


class OfflineModelServer:
    """Serve the offline model on ``host:port`` (port 0 picks a free one) until closed."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens_per_s: float = 0.0,
        faults: Sequence[Fault] = (),
    ) -> None:
        self._host = host
        self._port = port
        self._interval = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0
        self._faults = tuple(faults)
        self._faulted: dict[Fault, int] = {}  # requests each fault has applied to
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = asyncio.Event()
        self.released = asyncio.Event()
        """Set to let streams held by a ``hold`` fault go on."""
        self.streams_abandoned = 0
        """Streams the client closed before their end (an aborted job closes its HTTP stream)."""
        self.streams_finished = 0
        """Streams sent to their end."""

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("offline model server is not started")
        port = self._server.sockets[0].getsockname()[1]
        return f"http://{self._host}:{port}/v1"

    async def start(self) -> OfflineModelServer:
        self._server = await asyncio.start_server(self._on_connection, self._host, self._port)
        logger.info("offline model serving at %s", self.base_url)
        return self

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._closing.set()
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> OfflineModelServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except _BadRequest as e:
            self._respond(writer, 400, {"error": {"message": str(e), "type": "invalid_request_error"}})
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        if reader.at_eof():
            return False
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _ = request_line.split(" ", 2)
        except ValueError:
            raise _BadRequest(f"bad request line {request_line!r}") from None
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        path = target.split("?", 1)[0].rstrip("/")
        if method == "GET" and path.endswith("/models"):
            self._respond(writer, 200, {"object": "list", "data": [{"id": "offline", "object": "model"}]})
        elif method == "POST" and path.endswith("/chat/completions"):
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise _BadRequest(f"body is not JSON: {e}") from e
            return await self._completion(request, reader, writer)
        else:
            self._respond(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})
        await writer.drain()
        return headers.get("connection", "").lower() != "close"

    async def _completion(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        messages = request.get("messages") or []
        prompt = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
        tokens = tokenize(script_for(prompt))
        model = str(request.get("model", "offline"))
        fault = next((f for f in self._faults if f.match in prompt and self._faulted.get(f, 0) != f.times), None)
        if fault is not None:
            self._faulted[fault] = self._faulted.get(fault, 0) + 1
        if fault is not None and fault.kind == "status":
            self._respond(
                writer, 500, {"error": {"message": "offline model: scripted failure", "type": "server_error"}}
            )
            await writer.drain()
            return True
        usage = {"prompt_tokens": len(tokenize(prompt)), "completion_tokens": len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not request.get("stream"):
            self._respond(writer, 200, {
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "".join(tokens)}}],
                "usage": usage,
            })  # fmt: skip
            await writer.drain()
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )

        def event(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> None:
            body: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
            body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            body.update(extra)
            _write_chunk(writer, b"data: " + orjson.dumps(body) + b"\n\n")

        try:
            event({"role": "assistant", "content": ""})
            deadline = time.monotonic()
            for i, token in enumerate(tokens):
                if fault is not None and i == fault.after:
                    if fault.kind != "hold":
                        return await self._fail_stream(fault, reader, writer)
                    await writer.drain()
                    await self.released.wait()  # then on, at its pace from now
                    deadline = time.monotonic()
                if self._interval:
                    deadline += self._interval
                    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                    if reader.at_eof():
                        raise ConnectionResetError("client closed the stream")
                event({"content": token})
                await writer.drain()
        except ConnectionError:
            self.streams_abandoned += 1
            raise
        event({}, "stop")
        if (request.get("stream_options") or {}).get("include_usage"):
            event(None, usage=usage)
        _write_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self.streams_finished += 1
        return True

    async def _fail_stream(self, fault: Fault, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if fault.kind == "error":
            error = {"error": {"message": "offline model: scripted failure mid-stream", "type": "server_error"}}
            _write_chunk(writer, b"data: " + orjson.dumps(error) + b"\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if fault.kind == "stall":  # until the client goes away, or the server closes
            await writer.drain()
            closing = asyncio.ensure_future(self._closing.wait())
            client_gone = asyncio.ensure_future(reader.read())
            await asyncio.wait([closing, client_gone], return_when=asyncio.FIRST_COMPLETED)
            closing.cancel()
            client_gone.cancel()
            if reader.at_eof():
                raise ConnectionResetError("client closed the stream")
        return False  # disconnect: drop the connection mid-body

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
        payload = orjson.dumps(body)
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )


def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
