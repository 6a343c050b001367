"""The event stream: the daemon's epoch, the sequence numbers, the subscriber count, and publishing."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import zmq
import zmq.asyncio

from vramchat.daemon.transport import Listener
from vramchat.shared.protocol import Event

log = logging.getLogger(__name__)


class EventBus:
    """Publishes every event on every listener's XPUB, numbered within this daemon's epoch.

    A PUB socket past its high-water mark drops events silently; the sequence numbers are how a
    client notices and asks for a new snapshot (docs/protocol.md, late join).
    """

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners
        self.epoch = uuid.uuid4().hex[:16]  # new on every start: clients resync
        self.seq = 0
        self.subscribers = 0
        self.new_subscriber = asyncio.Event()

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.seq += 1
        frames = Event(topic=topic, epoch=self.epoch, seq=self.seq, body=body).frames()
        for listener in self.listeners:
            try:
                listener.publisher.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # a subscriber over its high-water mark; it will see the gap
                log.debug("event %d not sent on %s: %s", self.seq, listener.name, exc)

    async def watch_subscriptions(self, events: zmq.asyncio.Socket) -> None:
        """XPUB hands us each (un)subscription. Publishing on every change also tells a new
        subscriber that its subscription is active (it sees an event), which the Clone pattern's
        snapshot-after-subscribe needs. A client is its subscription to every topic (the empty
        prefix); one to a single topic (the TUI's `msg` doorbell, shared/client.py) is not another."""
        while True:
            frame = await events.recv()
            if frame == b"\x01":
                self.subscribers += 1
                self.new_subscriber.set()
            elif frame == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)
            else:
                continue
            self.publish("clients", {"count": self.subscribers})
