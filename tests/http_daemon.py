"""A real vramchatd serving the OpenAI-compatible HTTP API, and raw requests to it, for the tests
of the HTTP door (test_http_api, test_metrics, test_hostile_http, test_failures_alone)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vramchat.shared.client import Client

from helpers import DaemonFactory, DaemonProcess, free_port, wait_ready, wait_until

if TYPE_CHECKING:
    import openai


@dataclass
class HttpDaemon:
    daemon: DaemonProcess
    url: str  # ends in /v1
    key: str

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        import openai  # here: the modules that never speak HTTP do not pay for importing it

        return openai.AsyncOpenAI(base_url=self.url, api_key=key or self.key, max_retries=0, timeout=120)

    def post(self, path: str, body: bytes, key: str | None = None) -> tuple[int, dict[str, Any]]:
        """A raw request, for what the openai package would not send."""
        request = urllib.request.Request(
            self.url.removesuffix("/v1") + path, data=body, method="POST",
            headers={"Authorization": f"Bearer {key or self.key}", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def get(self, path: str, key: str | None = None) -> tuple[int, str, bytes]:
        """A GET with the key (or `key`; "" sends none): the status, the Content-Type and the body."""
        token = self.key if key is None else key
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.url.removesuffix("/v1") + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type", ""), error.read()


def start_http_daemon(daemon_factory: DaemonFactory, *args: str, command: list[str] | None = None) -> HttpDaemon:
    port = free_port()
    daemon = daemon_factory("--http", f"127.0.0.1:{port}", *args, command=command)
    key_file = daemon.data_dir / "api-key"
    wait_until(key_file.exists, timeout=20, what=lambda: f"the daemon made no API key:\n{daemon.log()}")
    served = HttpDaemon(daemon, f"http://127.0.0.1:{port}/v1", key_file.read_text().strip())
    wait_until(lambda: f"HTTP API on http://127.0.0.1:{port}" in daemon.log(), timeout=20, what=daemon.log)
    return served


async def model_ready(served: HttpDaemon) -> None:
    async with Client(served.daemon.runtime_dir) as client:
        await wait_ready(client, timeout=60)
