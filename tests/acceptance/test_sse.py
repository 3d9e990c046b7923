"""examples/fastapi_saga_sse.py end to end: a real uvicorn server in a subprocess, httpx reading
its Server-Sent Events, sagas stored on SQLite.

Nothing here is timed: waits are bounded (a stuck server fails the test instead of hanging it),
but no assertion depends on how long anything took.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.acceptance

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_saga_sse.py"
STARTUP_TIMEOUT = 60.0
TERMINAL_TIMEOUT = 60.0
_RUNNING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")

ORDER = {"items": ["book", "lamp"], "amount": 42.5, "address": "1 Main Street"}


class Server:
    """The example app under uvicorn on 127.0.0.1, a port picked by the OS (``--port 0``)."""

    def __init__(self, database: Path, command: list[str] | None = None) -> None:
        env = {**os.environ, "SAGAKIT_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
               "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command or [sys.executable, str(EXAMPLE), "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=EXAMPLE.parents[1],
        )
        self.lines: list[str] = []
        self._seen: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._seen.put(line)
        self._seen.put(None)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._seen.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            found = _RUNNING.search(line)
            if found:
                return found.group(1)
        self.stop()
        pytest.fail("the server did not start:\n" + self.log())

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("sse") / "sagas.db")
    try:
        yield server
    finally:
        server.stop()
        print(server.log())  # shown by pytest for a failing test


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30.0)) as client:
        yield client


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse a ``text/event-stream`` body into (event, data) pairs as they arrive."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())


def post_order(client: httpx.Client, **changes: Any) -> list[tuple[str, dict[str, Any]]]:
    with client.stream("POST", "/orders", json={**ORDER, **changes}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(events(response))


def wait_until_terminal(client: httpx.Client, saga_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TERMINAL_TIMEOUT
    while True:
        body = client.get(f"/sagas/{saga_id}").json()
        if body["status"] in ("COMPLETED", "FAILED"):
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"saga {saga_id} still {body['status']} after {TERMINAL_TIMEOUT} s")
        time.sleep(0.05)


def log_of(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e["step"], e["action"], e["status"]) for e in body["history"]]


def test_a_completed_order_streams_start_each_step_and_done(client):
    stream = post_order(client)
    names = [name for name, _ in stream]
    assert names == ["start", "step", "step", "step", "done"]
    saga_id = stream[0][1]["saga_id"]
    assert stream[0][1]["saga"] == "OrderSaga"
    assert {data["saga_id"] for _, data in stream} == {saga_id}
    assert [data["step"] for name, data in stream if name == "step"] == [
        "ReserveInventory", "ChargePayment", "ShipOrder",
    ]
    assert stream[-1][1]["status"] == "COMPLETED"

    body = client.get(f"/sagas/{saga_id}").json()
    assert body["status"] == "COMPLETED"
    assert body["name"] == "OrderSaga"
    assert log_of(body) == [
        ("ReserveInventory", "act", "COMPLETED"),
        ("ChargePayment", "act", "COMPLETED"),
        ("ShipOrder", "act", "COMPLETED"),
    ]
    assert body["context"]["shipment_id"].startswith("shipment-")


def test_a_failed_order_streams_its_compensations_and_the_error(client):
    stream = post_order(client, address="Atlantis")
    assert [name for name, _ in stream] == [
        "start", "step", "step", "compensation", "compensation", "error",
    ]
    assert [(d["step"], d["status"]) for name, d in stream if name == "compensation"] == [
        ("ChargePayment", "COMPENSATED"), ("ReserveInventory", "COMPENSATED"),
    ]
    error = stream[-1][1]
    assert error["status"] == "FAILED"
    assert error["step"] == "ShipOrder"
    assert error["error_type"] == "RuntimeError"
    assert error["message"] == "cannot ship to 'Atlantis'"

    body = client.get(f"/sagas/{error['saga_id']}").json()
    assert body["status"] == "FAILED"
    assert log_of(body) == [
        ("ReserveInventory", "act", "COMPLETED"),
        ("ChargePayment", "act", "COMPLETED"),
        ("ShipOrder", "act", "FAILED"),
        ("ChargePayment", "compensate", "COMPENSATED"),
        ("ReserveInventory", "compensate", "COMPENSATED"),
    ]
    failed = body["history"][2]
    assert failed["error_type"] == "RuntimeError"


def test_a_failing_first_step_has_nothing_to_compensate(client):
    stream = post_order(client, items=["unobtainium"])
    assert [name for name, _ in stream] == ["start", "error"]
    assert stream[-1][1]["error_type"] == "LookupError"
    assert stream[-1][1]["status"] == "FAILED"


def test_unknown_and_malformed_requests(client):
    assert client.get("/sagas/3f1c1a8e-0000-4000-8000-000000000000").status_code == 404
    assert client.get("/sagas/not-a-uuid").status_code == 422
    assert client.post("/orders", json={"items": [], "amount": 1, "address": "x"}).status_code == 422


def test_a_client_that_disconnects_mid_saga_does_not_stop_the_saga(client, server):
    # The payment step takes a while, so the client is gone long before the saga ends.
    with client.stream("POST", "/orders", json={**ORDER, "payment_delay": 1.0}) as response:
        received = events(response)
        name, start = next(received)
        assert name == "start"
        name, step = next(received)
        assert (name, step["step"]) == ("step", "ReserveInventory")
    # Leaving the block closed the connection without reading the rest of the stream.
    saga_id = start["saga_id"]
    body = wait_until_terminal(client, saga_id)
    assert body["status"] == "COMPLETED"
    assert log_of(body) == [
        ("ReserveInventory", "act", "COMPLETED"),
        ("ChargePayment", "act", "COMPLETED"),
        ("ShipOrder", "act", "COMPLETED"),
    ]
    # The server still answers streams after that.
    assert [name for name, _ in post_order(client)][-1] == "done"


# -- submit mode: the app's worker runs the saga, the client follows its step log ---------------


def submit_order(client: httpx.Client, **changes: Any) -> str:
    response = client.post("/orders/submit", json={**ORDER, **changes})
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["saga"], body["queue"]) == ("OrderSaga", "orders")
    assert body["events"] == f"/sagas/{body['saga_id']}/events"
    return str(body["saga_id"])


def follow(client: httpx.Client, saga_id: str) -> list[tuple[str, dict[str, Any]]]:
    with client.stream("GET", f"/sagas/{saga_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(events(response))


def entries(stream: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str, str]]:
    assert [name for name, _ in stream[:-1]] == ["log"] * (len(stream) - 1)
    return [(d["step"], d["action"], d["status"]) for _, d in stream[:-1]]


def test_a_submitted_order_answers_at_once_and_streams_its_step_log(client):
    saga_id = submit_order(client)
    stream = follow(client, saga_id)
    assert {data["saga_id"] for _, data in stream} == {saga_id}
    assert entries(stream) == [
        ("ReserveInventory", "act", "COMPLETED"),
        ("ChargePayment", "act", "COMPLETED"),
        ("ShipOrder", "act", "COMPLETED"),
    ]
    assert stream[-1] == ("done", {"saga_id": saga_id, "status": "COMPLETED"})
    body = client.get(f"/sagas/{saga_id}").json()
    assert body["status"] == "COMPLETED"
    assert body["context"]["shipment_id"].startswith("shipment-")


def test_a_submitted_order_that_fails_streams_its_compensations(client):
    saga_id = submit_order(client, address="Atlantis")
    stream = follow(client, saga_id)
    assert entries(stream) == [
        ("ReserveInventory", "act", "COMPLETED"),
        ("ChargePayment", "act", "COMPLETED"),
        ("ShipOrder", "act", "FAILED"),
        ("ChargePayment", "compensate", "COMPENSATED"),
        ("ReserveInventory", "compensate", "COMPENSATED"),
    ]
    failed = stream[2][1]
    assert failed["error_type"].endswith("RuntimeError")
    assert "cannot ship to 'Atlantis'" in failed["details"]
    assert stream[-1] == ("done", {"saga_id": saga_id, "status": "FAILED"})


def test_a_client_that_leaves_stops_nothing_and_a_late_one_gets_the_whole_log(client):
    saga_id = submit_order(client, payment_delay=1.0)
    with client.stream("GET", f"/sagas/{saga_id}/events") as response:
        name, first = next(events(response))
        assert (name, first["step"], first["action"]) == ("log", "ReserveInventory", "act")
    assert wait_until_terminal(client, saga_id)["status"] == "COMPLETED"
    stream = follow(client, saga_id)  # after the end: every entry, then done
    assert [step for step, _, _ in entries(stream)] == [
        "ReserveInventory", "ChargePayment", "ShipOrder"]
    assert stream[-1][1]["status"] == "COMPLETED"


def test_submit_mode_refuses_bad_requests_and_unknown_sagas(client):
    assert client.get("/sagas/3f1c1a8e-0000-4000-8000-000000000000/events").status_code == 404
    assert client.get("/sagas/not-a-uuid/events").status_code == 422
    response = client.post("/orders/submit", json={"items": [], "amount": 1, "address": "x"})
    assert response.status_code == 422


def test_uvicorn_serves_the_example_by_its_module_path(tmp_path: Path) -> None:
    """``uvicorn examples.fastapi_saga_sse:app`` from the repository root, as its docstring
    says: the app is built on first use, for SAGAKIT_DATABASE_URL, and runs a saga."""
    server = Server(tmp_path / "sagas.db", [sys.executable, "-m", "uvicorn",
                                            "examples.fastapi_saga_sse:app", "--port", "0"])
    try:
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30.0)) as client:
            assert client.get("/health").status_code == 200
            with client.stream("POST", "/orders", json=ORDER) as response:
                seen = list(events(response))
        assert seen[-1][0] == "done"
        assert seen[-1][1]["status"] == "COMPLETED"
    finally:
        server.stop()
