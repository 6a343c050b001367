"""vramchatd with a failure injected at each stage a request passes, for tests/test_failures_alone.py.

Run as `python tests/fault_injection.py [vramchatd arguments]`. A request fails at STAGE when its
request id (over HTTP, where the daemon makes the id: its last message) starts with
`fault-STAGE`; every other request passes untouched. The stages, in the order a request meets them:

- intake: the HTTP layer builds the job, or the control handler takes the chat in;
- queue: the worker takes the job off the queue and builds the engine's turn;
- worker: the worker loop itself, outside any one job (it dies, and is started again);
- channel: the daemon's end of the engine channel, handling a token frame;
- relay: publishing a token event to the subscribers.
"""

from __future__ import annotations

import sys
from typing import Any

from vramchat.daemon import cli, events, generation, handlers, http_api, supervisor


class InjectedFault(RuntimeError):
    pass


def fails(stage: str, text: Any) -> bool:
    return isinstance(text, str) and text.startswith(f"fault-{stage}")


def install() -> None:
    job_of = http_api.HttpApi._job

    def http_job(self: http_api.HttpApi, request: Any, chat: Any) -> Any:
        if fails("intake", chat.messages[-1].get("content")):
            raise InjectedFault("intake (HTTP)")
        return job_of(self, request, chat)

    on_chat = handlers.Handlers.on_chat

    async def control_chat(self: handlers.Handlers, request: Any, client: bytes) -> dict[str, Any]:
        if fails("intake", request.id):
            raise InjectedFault("intake (control)")
        return await on_chat(self, request, client)

    turn = generation.GenerationQueue._turn

    def queue_turn(self: generation.GenerationQueue, job: Any) -> Any:
        if fails("queue", job.request_id):
            raise InjectedFault("queue")
        return turn(self, job)

    alone = generation.GenerationQueue._alone

    async def worker_alone(self: generation.GenerationQueue, job: Any, engine: Any) -> None:
        if fails("worker", job.request_id):
            raise InjectedFault("worker")  # outside the job's own guard: the worker task dies
        await alone(self, job, engine)

    received = supervisor.EngineProcess._received

    def channel_received(self: supervisor.EngineProcess, message: dict[str, Any]) -> None:
        if message.get("ev") == "tok" and fails("channel", message.get("request")):
            raise InjectedFault("engine channel")
        received(self, message)

    publish = events.EventBus.publish

    def relay_publish(self: events.EventBus, topic: str, body: dict[str, Any]) -> None:
        if topic == "tok" and fails("relay", body.get("request")):
            raise InjectedFault("relay")
        publish(self, topic, body)

    http_api.HttpApi._job = http_job  # type: ignore[method-assign]
    handlers.Handlers.on_chat = control_chat  # type: ignore[method-assign]
    generation.GenerationQueue._turn = queue_turn  # type: ignore[method-assign]
    generation.GenerationQueue._alone = worker_alone  # type: ignore[method-assign]
    supervisor.EngineProcess._received = channel_received  # type: ignore[method-assign]
    events.EventBus.publish = relay_publish  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    sys.exit(cli.main())
