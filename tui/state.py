"""The daemon state as the TUI holds it, and what each snapshot or event changes in it (no Textual)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

HISTORY_KEPT = 1200
# Without an event for this long the daemon is taken to be gone, unless it publishes telemetry
# less often than that (`vramchatd --telemetry-interval`): then three of its periods.
SILENCE_S = 3.0
SILENT_PERIODS = 3


def view_start(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where the model's view of a conversation starts, from its latest reply that left messages
    out (`stats.context`: {"first_message", "dropped"}); None when it sees the whole conversation."""
    return next((m["stats"]["context"] for m in reversed(messages) if (m.get("stats") or {}).get("context")), None)


def view_marker(dropped: int) -> str:
    """The line above the first message the model still sees."""
    earlier = "1 earlier message is" if dropped == 1 else f"{dropped} earlier messages are"
    return f"{earlier} outside the context window: the model no longer sees them (they stay stored)"


def silence_limit(server: dict[str, Any]) -> float:
    """Seconds without an event after which the daemon that sent the `hello` reply `server` is gone.

    A daemon with a subscriber publishes telemetry every `telemetry_interval_s`; an older daemon
    does not say, and publishes every 0.5 s."""
    interval = server.get("telemetry_interval_s")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
        return max(SILENCE_S, SILENT_PERIODS * float(interval))
    return SILENCE_S


@dataclass
class InFlight:
    """The reply generating now, with its text so far in pieces."""

    message: str
    conversation: str
    parts: list[str]
    tokens: int = 0  # received in `tok` events (the snapshot's text so far is not counted)
    first_stamp: float | None = None  # the engine's time of the first token received, and of the latest
    last_stamp: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def progress(self) -> dict[str, Any]:
        """The tokens and seconds of the reply so far, as the `tok` events told them."""
        if self.first_stamp is None or self.last_stamp is None:
            return {"tokens": self.tokens, "seconds": 0.0}
        return {"tokens": self.tokens, "seconds": self.last_stamp - self.first_stamp}


@dataclass
class Changes:
    """What one snapshot or event changed; the app and its widgets redraw only that."""

    snapshot: bool = False  # everything was replaced: redraw it all, keeping a reader's place in the log
    state: bool = False  # model, telemetry or alarms: the memory bars and the other screens
    clients: bool = False  # the number of attached clients
    conversations: bool = False  # the conversation list
    log: bool = False  # the conversation on screen is another one: redraw the log
    queue: bool = False  # the queue line
    message: dict[str, Any] | None = None  # a message of the conversation on screen: mount, finish or remove it
    tokens: bool = False  # text of the conversation on screen waits in `unpainted`
    alarm: dict[str, Any] | None = None  # an alarm that has just become active


@dataclass
class ChatState:
    """Everything the daemon told this app, and which conversation is on screen.

    `apply_snapshot` replaces it all; `apply_event` applies one event on top. Both return the
    `Changes`, so rendering stays out of here and this can be tested without a terminal.
    """

    conversations: list[dict[str, Any]] = field(default_factory=list)  # newest first
    current: str | None = None  # the conversation on screen; None: a new chat, not created yet
    model: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # telemetry samples, oldest first
    alarms: list[dict[str, Any]] = field(default_factory=list)  # the active ones
    in_flight: InFlight | None = None
    queue: dict[str, Any] = field(default_factory=lambda: {"running": None, "pending": []})
    clients: int = 0
    downloads: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id: the daemon's pulls from the Hub
    # Tokens received for the conversation on screen and not drawn yet, per message id.
    unpainted: dict[str, list[str]] = field(default_factory=dict)
    # This app's recent chat and regenerate requests, newest last; the daemon's queue names requests.
    my_requests: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=64))

    def apply_snapshot(self, body: dict[str, Any]) -> Changes:
        self.model = body["model"]
        self.history = list((body.get("telemetry") or {}).get("history") or [])[-HISTORY_KEPT:]
        self.alarms = list(body.get("alarms") or [])
        self.conversations = list(body["conversations"])
        self.clients = body["clients"]
        flight = body["in_flight"]
        self.in_flight = InFlight(flight["message"], flight["conversation"], [flight["text"]]) if flight else None
        self.queue = body["queue"]
        self.downloads = {d["id"]: d for d in body.get("downloads") or []}  # an older daemon has none
        if self.current not in {c["id"] for c in self.conversations}:
            self.current = self.conversations[0]["id"] if self.conversations else None
        self.unpainted.clear()  # the log is drawn again, in-flight text included
        return Changes(snapshot=True, state=True, clients=True, conversations=True, log=True, queue=True)

    def apply_event(self, topic: str, body: dict[str, Any]) -> Changes:
        """Unknown topics change nothing: a newer daemon may publish more."""
        if topic == "telemetry":
            self.history.append(body)
            del self.history[:-HISTORY_KEPT]
            return Changes(state=True)
        if topic == "model":
            self.model = body
            return Changes(state=True)
        if topic == "clients":
            self.clients = body["count"]
            return Changes(clients=True)
        if topic == "alarm":
            self.alarms = [a for a in self.alarms if a["kind"] != body["kind"]] + ([body] if body["active"] else [])
            return Changes(state=True, alarm=body if body["active"] else None)
        if topic == "conversation":
            return self._conversation(body)
        if topic == "msg":
            return self._message(body)
        if topic == "tok":
            return self._token(body)
        if topic == "queue":
            self.queue = body
            return Changes(queue=True)
        if topic == "download":
            self.downloads[body["id"]] = body
            return Changes(state=True)
        return Changes()

    def _conversation(self, body: dict[str, Any]) -> Changes:
        conversation = body["conversation"]
        self.conversations = [c for c in self.conversations if c["id"] != conversation["id"]]
        if body["action"] != "deleted":
            self.conversations.insert(0, conversation)
            # Another version became current (an edit, a regenerate, a switch): redraw it if on screen.
            return Changes(conversations=True, log=body["action"] == "switched" and conversation["id"] == self.current)
        if conversation["id"] != self.current:
            return Changes(conversations=True)
        self.current = self.conversations[0]["id"] if self.conversations else None
        return Changes(conversations=True, log=True)

    def _message(self, message: dict[str, Any]) -> Changes:
        if message["status"] == "generating":
            self.in_flight = InFlight(message["id"], message["conversation_id"], [message["content"] or ""])
        elif self.in_flight and self.in_flight.message == message["id"]:
            self.in_flight = None
        if message["conversation_id"] != self.current:
            return Changes()
        if message["status"] != "generating":
            self.unpainted.pop(message["id"], None)  # the stored text replaces them
        return Changes(message=message)

    def _token(self, body: dict[str, Any]) -> Changes:
        if (flight := self.in_flight) and flight.message == body["message"]:
            flight.parts.append(body["text"])
            flight.tokens += body.get("count", 0)
            if stamps := body.get("t_tokens"):
                flight.first_stamp = stamps[0] if flight.first_stamp is None else flight.first_stamp
                flight.last_stamp = stamps[-1]
        if body["conversation"] != self.current:
            return Changes()
        self.unpainted.setdefault(body["message"], []).append(body["text"])
        return Changes(tokens=True)

    # --- what the widgets read -----------------------------------------------------------------

    def take_unpainted(self) -> dict[str, list[str]]:
        """The text to draw in this frame, per message; it is no longer unpainted."""
        pending, self.unpainted = self.unpainted, {}
        return pending

    def with_in_flight(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The stored messages with the text generated so far for the reply in flight, which is
        then drawn whole: nothing of it is left unpainted."""
        self.unpainted.clear()
        flight = self.in_flight
        return [{**m, "content": flight.text} if flight and m["id"] == flight.message else m for m in messages]

    def latest_sample(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    def current_conversation(self) -> dict[str, Any] | None:
        return next((c for c in self.conversations if c["id"] == self.current), None)

    def queue_text(self) -> str:
        """Where this app's requests stand in the daemon's queue; empty when there is nothing to say."""
        queue = self.queue
        mine = next((job for job in queue["pending"] if job["request"] in self.my_requests), None)
        running = queue["running"]
        running_is_mine = running is not None and running["request"] in self.my_requests
        # A job from outside vramchat (the HTTP API) names its client: "http 127.0.0.1:53122".
        others = f"a reply for {running['label']}" if running and running.get("label") else "another client's reply"
        if mine:
            ahead = mine["position"] - 1 + (1 if running else 0)
            text = f"queued: {ahead} request(s) ahead of yours"
            if running_is_mine:
                text += ", including your reply that is generating"
            elif running:
                text += f", {others} is generating"
            return text
        if running and not running_is_mine:
            return f"{others} is generating"
        return ""

    def cancel_target(self) -> str | None:
        """The request Esc cancels: the reply generating on screen, whoever asked for it; else this
        app's newest queued request, or its newest one that the queue has not shown yet."""
        running = self.queue["running"]
        if running and running["conversation"] == self.current:
            return str(running["request"])
        queued = [job["request"] for job in self.queue["pending"] if job["request"] in self.my_requests]
        if queued:
            return str(queued[-1])
        known = {job["request"] for job in self.queue["pending"]} | ({running["request"]} if running else set())
        latest = self.my_requests[-1] if self.my_requests else None
        return latest if latest not in known else None
