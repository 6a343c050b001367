"""The TUI's state reducer on its own: snapshots and events in, state and `Changes` out, no Textual."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from vramchat.tui.state import HISTORY_KEPT, SILENCE_S, Changes, ChatState, silence_limit, view_marker, view_start


def message(id_: str, status: str, content: str = "", conversation: str = "c1", role: str = "assistant") -> dict[str, Any]:
    return {"id": id_, "conversation_id": conversation, "role": role, "status": status, "content": content}


def conversation(id_: str, title: str = "t") -> dict[str, Any]:
    return {"id": id_, "title": title, "settings": {}, "system_prompt": None}


def snapshot(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "epoch": "e",
        "seq": 7,
        "model": {"state": "ready", "name": "m.gguf"},
        "clients": 2,
        "in_flight": None,
        "queue": {"running": None, "pending": []},
        "conversations": [conversation("c1"), conversation("c2")],
        "telemetry": {"history": [{"t": 1}, {"t": 2}]},
        "alarms": [],
    }
    return {**body, **overrides}


def test_the_module_does_not_need_textual() -> None:
    code = "import sys, vramchat.tui.state; assert 'textual' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_snapshot_sets_everything_and_shows_the_newest_conversation() -> None:
    state = ChatState()
    changes = state.apply_snapshot(snapshot())
    assert changes == Changes(snapshot=True, state=True, clients=True, conversations=True, log=True, queue=True)
    assert state.current == "c1" and state.clients == 2 and state.model["name"] == "m.gguf"
    assert state.history == [{"t": 1}, {"t": 2}] and state.in_flight is None


def test_a_snapshot_replaces_everything_but_keeps_the_conversation_on_screen_if_it_still_exists() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot())
    state.current = "c2"
    state.apply_event("tok", {"message": "old", "conversation": "c2", "text": "stale"})
    state.apply_event("alarm", {"kind": "swap", "active": True, "severity": "warning", "message": "m"})
    state.apply_snapshot(
        snapshot(
            conversations=[conversation("c3"), conversation("c2")],
            clients=1,
            alarms=[],
            model={"state": "loading"},
            telemetry={"history": [{"t": 9}]},
        )
    )
    assert state.current == "c2" and [c["id"] for c in state.conversations] == ["c3", "c2"]
    assert state.alarms == [] and state.clients == 1 and state.model == {"state": "loading"} and state.history == [{"t": 9}]
    assert state.unpainted == {}  # the log is drawn again from the store
    state.apply_snapshot(snapshot(conversations=[conversation("c9")]))
    assert state.current == "c9"  # c2 is gone: the newest one
    state.apply_snapshot(snapshot(conversations=[]))
    assert state.current is None


def test_a_snapshot_keeps_only_the_newest_history() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot(telemetry={"history": [{"t": i} for i in range(HISTORY_KEPT + 5)]}))
    assert len(state.history) == HISTORY_KEPT and state.history[0] == {"t": 5}
    state.apply_event("telemetry", {"t": "new"})
    assert len(state.history) == HISTORY_KEPT and state.history[-1] == {"t": "new"}


def test_a_snapshot_with_a_reply_in_flight_then_tokens_build_its_text() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot(in_flight={"message": "m2", "conversation": "c1", "text": "Hel"}))
    assert state.apply_event("tok", {"message": "m2", "conversation": "c1", "text": "lo"}) == Changes(tokens=True)
    assert state.apply_event("tok", {"message": "m2", "conversation": "c1", "text": "!"}).tokens
    assert state.in_flight is not None and state.in_flight.text == "Hello!"
    assert state.take_unpainted() == {"m2": ["lo", "!"]} and state.unpainted == {}
    stored = [message("m1", "complete", "hi", role="user"), message("m2", "generating", "")]
    shown = state.with_in_flight(stored)
    assert [m["content"] for m in shown] == ["hi", "Hello!"] and stored[1]["content"] == ""


def test_tokens_of_another_conversation_build_the_in_flight_text_but_nothing_to_paint() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot())
    state.apply_event("msg", message("m5", "generating", conversation="c2"))
    changes = state.apply_event("tok", {"message": "m5", "conversation": "c2", "text": "x"})
    assert changes == Changes() and state.unpainted == {}
    assert state.in_flight is not None and state.in_flight.text == "x"


def test_a_msg_event_starts_a_reply_and_another_finishes_it() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot())
    started = message("m2", "generating")
    assert state.apply_event("msg", started) == Changes(message=started)
    assert state.in_flight is not None and state.in_flight.message == "m2"
    state.apply_event("tok", {"message": "m2", "conversation": "c1", "text": "The answer"})
    done = message("m2", "complete", "The answer is 42.")
    assert state.apply_event("msg", done) == Changes(message=done)
    assert state.in_flight is None
    assert state.unpainted == {}  # the stored text replaces what was not painted yet


def test_a_msg_event_of_another_conversation_changes_nothing_on_screen() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot())
    assert state.apply_event("msg", message("m3", "generating", conversation="c2")) == Changes()
    assert state.in_flight is not None  # still the reply generating now
    assert state.apply_event("msg", message("m3", "complete", "done", conversation="c2")) == Changes()
    assert state.in_flight is None


def test_conversations_created_updated_and_deleted() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot())
    created = state.apply_event("conversation", {"action": "created", "conversation": conversation("c3", "new")})
    assert created == Changes(conversations=True)
    assert [c["id"] for c in state.conversations] == ["c3", "c1", "c2"]
    state.apply_event("conversation", {"action": "updated", "conversation": conversation("c2", "renamed")})
    assert [(c["id"], c["title"]) for c in state.conversations] == [("c2", "renamed"), ("c3", "new"), ("c1", "t")]
    assert state.current == "c1"
    deleted = state.apply_event("conversation", {"action": "deleted", "conversation": conversation("c3")})
    assert deleted == Changes(conversations=True)
    assert state.current == "c1"  # another one was deleted: the log stays
    changes = state.apply_event("conversation", {"action": "deleted", "conversation": conversation("c1")})
    assert changes == Changes(conversations=True, log=True) and state.current == "c2"
    state.apply_event("conversation", {"action": "deleted", "conversation": conversation("c2")})
    assert state.current is None and state.conversations == []


def test_model_clients_alarms_and_unknown_topics() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot())
    assert state.apply_event("model", {"state": "loading", "progress": 0.5}) == Changes(state=True)
    assert state.model["progress"] == 0.5
    assert state.apply_event("clients", {"count": 3}) == Changes(clients=True) and state.clients == 3
    alarm = {"kind": "swap", "active": True, "severity": "critical", "message": "swapping"}
    assert state.apply_event("alarm", alarm) == Changes(state=True, alarm=alarm) and state.alarms == [alarm]
    assert state.apply_event("alarm", {**alarm, "message": "still"}).alarm is not None and len(state.alarms) == 1
    assert state.apply_event("alarm", {**alarm, "active": False}) == Changes(state=True) and state.alarms == []
    assert state.apply_event("a-topic-from-a-newer-daemon", {"x": 1}) == Changes()


def test_the_queue_line_and_what_escape_cancels() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot())
    assert state.queue_text() == "" and state.cancel_target() is None
    state.my_requests.append("mine")
    assert state.cancel_target() == "mine"  # just sent: not in the daemon's queue yet
    other = {"request": "theirs", "conversation": "c2"}
    assert state.apply_event("queue", {"running": other, "pending": [{"request": "mine", "position": 1}]}) == Changes(queue=True)
    assert state.queue_text() == "queued: 1 request(s) ahead of yours, another client's reply is generating"
    assert state.cancel_target() == "mine"  # not the other client's, on another conversation
    state.apply_event(
        "queue", {"running": {"request": "theirs", "conversation": "c1"}, "pending": [{"request": "mine", "position": 1}]}
    )
    assert state.cancel_target() == "theirs"  # the reply generating on screen, whoever asked for it
    state.apply_event("queue", {"running": {"request": "mine", "conversation": "c1"}, "pending": []})
    assert state.queue_text() == ""
    state.my_requests.append("second")
    state.apply_event(
        "queue", {"running": {"request": "mine", "conversation": "c2"}, "pending": [{"request": "second", "position": 1}]}
    )
    assert state.queue_text() == "queued: 1 request(s) ahead of yours, including your reply that is generating"
    state.apply_event("queue", {"running": other, "pending": []})
    assert state.queue_text() == "another client's reply is generating"
    assert state.cancel_target() == "second"  # not in the queue, so to this app it may be just sent


def test_the_queue_line_names_a_job_from_the_http_api() -> None:
    state = ChatState()
    state.apply_snapshot(snapshot())
    http = {"request": "http-1", "conversation": None, "label": "http 127.0.0.1:53122"}
    state.apply_event("queue", {"running": http, "pending": []})
    assert state.queue_text() == "a reply for http 127.0.0.1:53122 is generating"
    state.my_requests.append("mine")
    state.apply_event("queue", {"running": http, "pending": [{"request": "mine", "position": 1, "label": None}]})
    assert state.queue_text() == "queued: 1 request(s) ahead of yours, a reply for http 127.0.0.1:53122 is generating"


def test_the_silence_limit_follows_the_daemons_telemetry_period() -> None:
    assert silence_limit({}) == SILENCE_S == 3.0  # an older daemon: it publishes every 0.5 s
    assert silence_limit({"telemetry_interval_s": 0.5}) == 3.0
    assert silence_limit({"telemetry_interval_s": 5}) == 15.0
    assert silence_limit({"telemetry_interval_s": 86400.0}) == 3 * 86400.0
    assert silence_limit({"telemetry_interval_s": "5"}) == 3.0 and silence_limit({"telemetry_interval_s": True}) == 3.0
    assert silence_limit({"telemetry_interval_s": None}) == 3.0


def test_the_view_starts_at_the_latest_reply_that_left_messages_out() -> None:
    messages = [message(f"m{i}", "complete", role="user" if i % 2 == 0 else "assistant") for i in range(6)]
    assert view_start(messages) is None
    messages[3]["stats"] = {"context": {"first_message": "m2", "dropped": 2}}
    messages[5]["stats"] = {"context": None}
    assert view_start(messages) == {"first_message": "m2", "dropped": 2}
    messages[5]["stats"] = {"context": {"first_message": "m4", "dropped": 4}}
    assert view_start(messages) == {"first_message": "m4", "dropped": 4}
    assert view_marker(1).startswith("1 earlier message is outside the context window")
    assert view_marker(4).startswith("4 earlier messages are outside the context window")
