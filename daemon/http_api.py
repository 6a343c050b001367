"""The OpenAI-compatible HTTP API (chat completions, models, health), served on the daemon's own loop.

Every request needs `Authorization: Bearer KEY` (shared/api_key.py). A completion is a job in the
same queue as every chat, with the same limits and checks; it is not stored unless the request
names a conversation (`"conversation": ID`, a vramchat extension), so scripts do not fill the
conversation list. docs/protocol.md, "HTTP API", has the details.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from vramchat.daemon.generation import GenerationQueue
from vramchat.daemon.jobs import Job, JobResult
from vramchat.daemon.metrics import DaemonMetrics
from vramchat.daemon.model_lifecycle import ModelLifecycle
from vramchat.daemon.openai_reply import Completion, openai_error, sse
from vramchat.daemon.openai_request import ChatRequest, parse_request
from vramchat.daemon.store import NotFound, Store
from vramchat.daemon.transport import RATE_PER_S, RateLimiter
from vramchat.shared import protocol
from vramchat.shared.protocol import ProtocolError

log = logging.getLogger(__name__)

# HTTP status of each error code a request can get (docs/protocol.md, "Error codes").
STATUS_OF = {
    "not_found": 404,
    "too_large": 413,
    "queue_full": 429,
    "rate_limited": 429,
    "no_model": 503,
    "internal": 500,
}


def parse_address(address: str, *, allow_remote: bool) -> tuple[str, int]:
    """HOST:PORT, refused off loopback unless the config allows it: the key is then all that
    stands between the network and every conversation the daemon serves."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SystemExit(f"--http wants HOST:PORT, e.g. 127.0.0.1:8080, not {address!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise SystemExit(
            f"--http {address} is not a loopback address: anyone who reaches it needs only the API key. "
            "Listen on 127.0.0.1 and use an SSH tunnel (README, Security), or set http_allow_remote = true "
            "in the config to mean it"
        )
    if not loopback:
        log.warning(
            "HTTP API LISTENING ON %s, OFF LOOPBACK: the API key is its only protection, and it travels "
            "in clear text without TLS",
            address,
        )
    return host, int(port_text)


class HttpApi:
    """The aiohttp application and its listener; `start` binds, `stop` closes open streams."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        key: str,
        store: Store,
        model: ModelLifecycle,
        generation: GenerationQueue,
        rate_limiter: RateLimiter,
        metrics: DaemonMetrics,
    ) -> None:
        self.host, self.port, self.key, self.rate_limiter = host, port, key, rate_limiter
        self.store, self.model, self.generation, self.metrics = store, model, generation, metrics
        app = web.Application(client_max_size=protocol.MAX_REQUEST_BYTES, middlewares=[self._errors_and_auth])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)  # behind the key too: it names the model and its memory
        # A client that hangs up cancels its handler, and with it its job.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("HTTP API on http://%s:%d/v1", self.host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()

    @web.middleware
    async def _errors_and_auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
            message = "a valid `Authorization: Bearer KEY` header is required; `vramchat api-key` prints the key"
            return web.json_response(openai_error(message, "authentication_error", "invalid_api_key"), status=401)
        if not self.rate_limiter.allow(client_of(request)[0]):
            return error_response(ProtocolError("rate_limited", f"more than {RATE_PER_S:.0f} requests a second; slow down"))
        try:
            response: web.StreamResponse = await handler(request)
        except ProtocolError as error:
            return error_response(error)
        except web.HTTPRequestEntityTooLarge:
            limit = protocol.MAX_REQUEST_BYTES >> 20
            return error_response(ProtocolError("too_large", f"the request is larger than {limit} MiB; send a shorter prompt"))
        except web.HTTPException as exc:  # 404 for an unknown path, 405 for a wrong method
            return web.json_response(openai_error(exc.reason, "invalid_request_error"), status=exc.status)
        except Exception:  # a bug: this request fails, with an answer, and the daemon serves the next
            log.exception("HTTP %s %s failed", request.method, request.path)
            message = f"the daemon failed on {request.method} {request.path}; see its log"
            return error_response(ProtocolError("internal", message))
        return response

    async def health(self, _request: web.Request) -> web.StreamResponse:
        state = self.model.state
        return web.json_response({"status": "ok" if state.state == "ready" else state.state, "model": state.name})

    async def prometheus(self, _request: web.Request) -> web.StreamResponse:
        """Prometheus' text format (daemon/metrics.py); a scrape config sends the key as its bearer token."""
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, _request: web.Request) -> web.StreamResponse:
        found = sorted(self.model.known_models(), key=lambda m: not m["loaded"])  # the loaded model first
        data = [{"id": m["name"], "object": "model", "created": 0, "owned_by": "vramchat", "loaded": m["loaded"]} for m in found]
        return web.json_response({"object": "list", "data": data})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        chat = parse_request(await read_json(request))
        job = self._job(request, chat)
        self.generation.check_room(job.client)
        if job.conversation_id is not None:
            user = job.messages[-1]["content"] if job.messages else ""
            self.generation.add_user_message(job.conversation_id, user)
            job.messages = None  # from the stored conversation, which now ends with this message
        reply = Completion(self.model.state.name or "", chat.include_usage, tools=chat.tools_offered, structured=chat.structured)
        self.generation.enqueue(job)
        try:
            if not chat.stream:
                result = await job.result()
                return web.json_response(reply.whole(result), status=200 if result.ok else result_status(result))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                async for chunk in reply.chunks(job):
                    await response.write(chunk)
            except ConnectionError:
                raise  # the client hung up: nobody to tell
            except Exception:  # a bug while relaying: the headers are sent, so end the stream with an error event
                log.exception("relaying the HTTP stream of %s failed", job.request_id)
                error = openai_error("the daemon failed while relaying this reply; see its log", "server_error", "internal")
                await response.write(sse(error) + b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            if not job.done:  # the client hung up: free the engine within one token
                with contextlib.suppress(ProtocolError):
                    self.generation.cancel(job.request_id, reason="the HTTP client disconnected")

    def _job(self, request: web.Request, chat: ChatRequest) -> Job:
        conversation = chat.conversation
        if conversation is not None:
            try:
                conversation = self.store.resolve_conversation(conversation)
            except NotFound as exc:
                raise ProtocolError("not_found", str(exc.args[0])) from None
            if chat.messages[-1]["role"] != "user":
                raise ProtocolError("invalid_value", "with a conversation, the last message must be the user's new one")
        client, label = client_of(request)
        return Job(
            request_id=f"http-{uuid.uuid4().hex}",
            conversation_id=conversation,
            client=client,
            sampling=chat.sampling,
            label=label,
            messages=chat.messages,
            stop=chat.stop,
            streamed=chat.stream,
            engine=chat.engine,
        )


def client_of(request: web.Request) -> tuple[bytes, str]:
    """Who asked: the key the limits count by (the IP address) and the label the queue shows."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host, port = (peer[0], peer[1]) if peer else ("unknown", 0)
    return f"http:{host}".encode(), f"http {host}:{port}"


def result_status(result: JobResult) -> int:
    """The status of a reply that failed in the engine or the queue."""
    if result.code in ("prompt_too_long", "bad_request", "invalid_value"):
        return 400
    return STATUS_OF.get(result.code or "", 500)


def error_response(error: ProtocolError) -> web.Response:
    status = STATUS_OF.get(error.code, 400)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(openai_error(error.message, kind, error.code), status=status)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object of valid text, whatever charset the request claims: JSON is UTF-8."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("invalid_value", f"the body is not UTF-8 (byte {exc.start}); send JSON encoded as UTF-8") from None
    try:
        body = json.loads(text)
        protocol.refuse_invalid_text(body, "the body")
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_request", f"the body is not JSON ({exc}); send a JSON object") from None
    except RecursionError:
        raise ProtocolError("bad_request", "the body nests too deeply; send a JSON object as OpenAI's API documents it") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "the body must be a JSON object")
    return body
