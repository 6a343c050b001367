"""The request handlers, one per request type (docs/protocol.md), and the error reply each failure gets."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vramchat.daemon.background import BackgroundTasks
from vramchat.daemon.downloads import Downloads
from vramchat.daemon.events import EventBus
from vramchat.daemon.generation import GenerationQueue, checked_sampling, checked_settings
from vramchat.daemon.jobs import Job
from vramchat.daemon.model_lifecycle import ModelLifecycle
from vramchat.daemon.monitor import Monitor
from vramchat.daemon.openai_request import control_json_schema
from vramchat.daemon.store import NotFound, Store, StoreError
from vramchat.daemon.transport import Replier
from vramchat.shared import __version__, protocol
from vramchat.shared.config import Config
from vramchat.shared.protocol import ProtocolError, Request, field_of
from vramchat.shared.text import title_from

log = logging.getLogger(__name__)

Handler = Callable[[Request, bytes], Awaitable[dict[str, Any]]]

DEFAULT_SEARCH_RESULTS = 50
MAX_SEARCH_RESULTS = 200


@dataclass(frozen=True)
class DaemonInfo:
    """What `hello` and `status` say about the daemon itself."""

    runtime_dir: Path
    data_dir: Path
    telemetry_interval_s: float
    started_at: float


class Handlers:
    """Each handler checks its request's fields and calls the part of the daemon that does the work."""

    def __init__(
        self,
        *,
        info: DaemonInfo,
        config: Config,
        store: Store,
        bus: EventBus,
        model: ModelLifecycle,
        generation: GenerationQueue,
        monitor: Monitor,
        tasks: BackgroundTasks,
        downloads: Downloads,
    ) -> None:
        self.info, self.config, self.store, self.bus = info, config, store, bus
        self.model, self.generation, self.monitor, self.tasks = model, generation, monitor, tasks
        self.downloads = downloads
        self.handlers: dict[str, Handler] = {
            "hello": self.on_hello,
            "snapshot": self.on_snapshot,
            "status": self.on_status,
            "models": self.on_models,
            "load": self.on_load,
            "unload": self.on_unload,
            "chat": self.on_chat,
            "regenerate": self.on_regenerate,
            "cancel": self.on_cancel,
            "conversation.create": self.on_conversation_create,
            "conversation.list": self.on_conversation_list,
            "conversation.get": self.on_conversation_get,
            "conversation.update": self.on_conversation_update,
            "conversation.delete": self.on_conversation_delete,
            "conversation.switch": self.on_conversation_switch,
            "conversation.search": self.on_conversation_search,
            "edit": self.on_edit,
            "pull": self.on_pull,
            "pull.cancel": self.on_pull_cancel,
        }
        assert set(self.handlers) == set(protocol.REQUEST_TYPES), "protocol.REQUEST_TYPES and the handlers disagree"

    async def dispatch(self, request: Request, client: bytes, reply: Replier) -> None:
        handler = self.handlers.get(request.type)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            reply.error(request.id, ProtocolError("unknown_type", f"unknown request type {request.type!r}; known: {known}"))
        elif request.type in ("load", "unload", "pull"):  # they wait their turn, a load takes minutes, a pull asks the Hub
            self.tasks.spawn(self._answer(handler, request, client, reply))
        else:
            await self._answer(handler, request, client, reply)

    async def _answer(self, handler: Handler, request: Request, client: bytes, reply: Replier) -> None:
        """Exactly one reply: the handler's body, or an error a person can act on."""
        try:
            reply.ok(request.id, await handler(request, client))  # encoding the body can fail too
        except ProtocolError as error:
            reply.error(request.id, error)
        except NotFound as exc:
            reply.error(request.id, ProtocolError("not_found", str(exc.args[0])))
        except StoreError as exc:
            reply.error(request.id, ProtocolError("storage", str(exc)))
        except Exception:
            log.exception("handler for %r failed", request.type)
            reply.error(request.id, ProtocolError("internal", f"the daemon failed on {request.type!r}; see its log"))

    # --- session -----------------------------------------------------------------------------

    async def on_hello(self, request: Request, _client: bytes) -> dict[str, Any]:
        client_version = field_of(request.body, "protocol", int)
        if client_version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(
                "protocol_mismatch",
                f"this daemon speaks protocol {protocol.PROTOCOL_VERSION}, the client {client_version}; "
                "install the same vramchat version on both sides",
            )
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "version": __version__,
            "epoch": self.bus.epoch,
            "pid": os.getpid(),
            "max_request_bytes": protocol.MAX_REQUEST_BYTES,
            "telemetry_interval_s": self.info.telemetry_interval_s,
        }

    async def on_snapshot(self, _request: Request, _client: bytes) -> dict[str, Any]:
        flight = self.generation.in_flight
        in_flight = None
        if flight is not None and flight.message_id is not None:  # an unstored HTTP reply stays private
            in_flight = {
                "request": flight.job.request_id,
                "conversation": flight.job.conversation_id,
                "message": flight.message_id,
                "text": flight.text,
                "tokens": flight.tokens,
            }
        history = self.monitor.sampler.history()  # once: the sampler thread may add one meanwhile
        return {
            "epoch": self.bus.epoch,
            "seq": self.bus.seq,
            "model": self.model.state.to_wire(),
            "conversations": self.store.list_conversations(),
            "in_flight": in_flight,
            "queue": self.generation.state(),
            "clients": self.bus.subscribers,
            "telemetry": {"latest": history[-1] if history else None, "history": history},
            "alarms": list(self.monitor.alarms.active.values()),
            "downloads": self.downloads.views(),
        }

    async def on_status(self, _request: Request, _client: bytes) -> dict[str, Any]:
        return {
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "epoch": self.bus.epoch,
                "uptime_s": time.time() - self.info.started_at,
                "clients": self.bus.subscribers,
                "runtime_dir": str(self.info.runtime_dir),
                "data_dir": str(self.info.data_dir),
                "tasks": self.tasks.report(),
            },
            "model": self.model.state.to_wire(),
            "queue": self.generation.state(),
            "telemetry": self.monitor.sampler.latest(),
            "alarms": list(self.monitor.alarms.active.values()),
            "downloads": self.downloads.views(),
        }

    # --- models ------------------------------------------------------------------------------

    async def on_models(self, _request: Request, _client: bytes) -> dict[str, Any]:
        return {"models": self.model.known_models(), "model_dirs": [str(d) for d in self.config.model_dirs]}

    async def on_load(self, request: Request, _client: bytes) -> dict[str, Any]:
        return await self.model.load(request.body)

    async def on_unload(self, _request: Request, _client: bytes) -> dict[str, Any]:
        return await self.model.unload("by a client (vramchat unload)")

    async def on_pull(self, request: Request, _client: bytes) -> dict[str, Any]:
        return await self.downloads.pull(request.body)

    async def on_pull_cancel(self, request: Request, _client: bytes) -> dict[str, Any]:
        return await self.downloads.cancel(request.body)

    # --- generation --------------------------------------------------------------------------

    async def on_chat(self, request: Request, client: bytes) -> dict[str, Any]:
        body = request.body
        content = field_of(body, "content", str)
        if not content.strip():
            raise ProtocolError("invalid_value", "the message is empty")
        sampling = checked_sampling(field_of(body, "sampling", dict, {}))
        schema = field_of(body, "json_schema", dict, None)
        engine = control_json_schema(schema, sampling) if schema is not None else {}
        self.generation.check_room(client)
        if conversation_ref := field_of(body, "conversation", str, None):
            conversation = self.store.get_conversation(self.store.resolve_conversation(conversation_ref))
        else:
            conversation = self.store.create_conversation(title=title_from(content))
            self.bus.publish("conversation", {"action": "created", "conversation": conversation})
        user_message = self.generation.add_user_message(conversation["id"], content)
        return self._enqueue(Job(request.id, conversation["id"], client, sampling, engine=engine), user_message)

    async def on_regenerate(self, request: Request, client: bytes) -> dict[str, Any]:
        """Queue a new reply beside an earlier one (by default the last): the earlier reply, and
        whatever followed it, stay stored as an earlier version."""
        body = request.body
        conversation_id = self.store.resolve_conversation(field_of(body, "conversation", str))
        reply_id = field_of(body, "message", str, None)
        sampling = checked_sampling(field_of(body, "sampling", dict, {}))
        self._check_idle(conversation_id)
        self.generation.check_room(client)
        branch = self.store.messages(conversation_id)
        if not any(m["role"] == "user" for m in branch):
            raise ProtocolError("invalid_value", "there is no message to answer again in this conversation")
        replaced = self._on_branch(conversation_id, branch, reply_id) if reply_id is not None else branch[-1]
        if replaced["role"] != "assistant":
            if reply_id is not None:
                raise ProtocolError("invalid_value", f"message {reply_id!r} is a question, not a reply: edit it instead")
        else:  # the new reply will follow the same question: the head goes back there meanwhile
            self.store.set_head(conversation_id, replaced["parent_id"])
            self._publish_switched(conversation_id)
        return self._enqueue(Job(request.id, conversation_id, client, sampling), None)

    def _enqueue(self, job: Job, user_message: dict[str, Any] | None) -> dict[str, Any]:
        position = self.generation.enqueue(job)
        return {
            "request": job.request_id,
            "conversation": job.conversation_id,
            "user_message": user_message,
            "position": position,
        }

    async def on_cancel(self, request: Request, _client: bytes) -> dict[str, Any]:
        return {"cancelled": self.generation.cancel(field_of(request.body, "request", str))}

    # --- versions: edit, switch, search ------------------------------------------------------

    async def on_edit(self, request: Request, client: bytes) -> dict[str, Any]:
        """Store a new version of a question beside the old one and answer it; the old question
        and everything after it stay stored, and conversation.switch brings them back."""
        body = request.body
        conversation_id = self.store.resolve_conversation(field_of(body, "conversation", str))
        message_id = field_of(body, "message", str)
        content = field_of(body, "content", str)
        if not content.strip():
            raise ProtocolError("invalid_value", "the message is empty")
        sampling = checked_sampling(field_of(body, "sampling", dict, {}))
        self._check_idle(conversation_id)
        self.generation.check_room(client)
        edited = self._on_branch(conversation_id, self.store.messages(conversation_id), message_id)
        if edited["role"] != "user":
            raise ProtocolError("invalid_value", f"message {message_id!r} is a reply: regenerate it instead of editing")
        user_message = self.generation.add_user_message(conversation_id, content, parent=edited["parent_id"])
        self._publish_switched(conversation_id)
        return self._enqueue(Job(request.id, conversation_id, client, sampling), user_message)

    async def on_conversation_switch(self, request: Request, _client: bytes) -> dict[str, Any]:
        """Make current the branch through a message (another version), down to its newest message."""
        conversation_id = self.store.resolve_conversation(field_of(request.body, "conversation", str))
        message_id = field_of(request.body, "message", str)
        self._check_idle(conversation_id)
        conversation = self.store.switch(conversation_id, message_id)
        self._publish_switched(conversation_id)
        return {"conversation": conversation, "messages": self.store.messages(conversation_id)}

    async def on_conversation_search(self, request: Request, _client: bytes) -> dict[str, Any]:
        text = field_of(request.body, "text", str)
        if not text.strip():
            raise ProtocolError("invalid_value", "nothing to search for: give one or more words")
        limit = field_of(request.body, "limit", int, DEFAULT_SEARCH_RESULTS)
        if not 1 <= limit <= MAX_SEARCH_RESULTS:
            raise ProtocolError("invalid_value", f"limit must be between 1 and {MAX_SEARCH_RESULTS}, not {limit}")
        return {"results": self.store.search(text, limit)}

    def _check_idle(self, conversation_id: str) -> None:
        """Versions change only between replies: a reply in flight is attached to the head."""
        if self.generation.has_work_for(conversation_id):
            raise ProtocolError("busy", "this conversation has a reply queued or generating; wait for it, or cancel it")

    def _on_branch(self, conversation_id: str, branch: list[dict[str, Any]], message_id: str) -> dict[str, Any]:
        """The message `message_id` of the current branch; not_found, or invalid_value when it is
        stored in an earlier version only."""
        if found := next((m for m in branch if m["id"] == message_id), None):
            return found
        if self.store.get_message(message_id)["conversation_id"] != conversation_id:
            raise NotFound(f"no message {message_id!r} in conversation {conversation_id!r}")
        raise ProtocolError(
            "invalid_value", f"message {message_id!r} is in an earlier version: switch to it first (conversation.switch)"
        )

    def _publish_switched(self, conversation_id: str) -> None:
        self.bus.publish("conversation", {"action": "switched", "conversation": self.store.get_conversation(conversation_id)})

    # --- conversations -----------------------------------------------------------------------

    async def on_conversation_create(self, request: Request, _client: bytes) -> dict[str, Any]:
        conversation = self.store.create_conversation(
            title=field_of(request.body, "title", str, "New conversation"),
            system_prompt=field_of(request.body, "system_prompt", str, ""),
            settings=checked_settings(field_of(request.body, "settings", dict, {})),
        )
        self.bus.publish("conversation", {"action": "created", "conversation": conversation})
        return {"conversation": conversation}

    async def on_conversation_list(self, _request: Request, _client: bytes) -> dict[str, Any]:
        return {"conversations": self.store.list_conversations()}

    async def on_conversation_get(self, request: Request, _client: bytes) -> dict[str, Any]:
        conversation_id = self.store.resolve_conversation(field_of(request.body, "id", str))
        return {"conversation": self.store.get_conversation(conversation_id), "messages": self.store.messages(conversation_id)}

    async def on_conversation_update(self, request: Request, _client: bytes) -> dict[str, Any]:
        body = request.body
        conversation_id = self.store.resolve_conversation(field_of(body, "id", str))
        settings = field_of(body, "settings", dict, None)
        conversation = self.store.update_conversation(
            conversation_id,
            title=field_of(body, "title", str, None),
            system_prompt=field_of(body, "system_prompt", str, None),
            settings=checked_settings(settings) if settings is not None else None,
        )
        self.bus.publish("conversation", {"action": "updated", "conversation": conversation})
        return {"conversation": conversation}

    async def on_conversation_delete(self, request: Request, _client: bytes) -> dict[str, Any]:
        conversation_id = self.store.resolve_conversation(field_of(request.body, "id", str))
        if self.generation.has_work_for(conversation_id):
            raise ProtocolError("busy", "this conversation has a reply queued or generating; cancel it first")
        self.store.delete_conversation(conversation_id)
        self.bus.publish("conversation", {"action": "deleted", "conversation": {"id": conversation_id}})
        return {"deleted": conversation_id}
