"""Requests on their way to the engine (kvtier.integrations.front): the counters in a memory
file, kvtier's middleware counting through a real Starlette app, and the hits-first
scheduler (simulated engine, vLLM's own scheduler) waiting for a burst's requests exactly as
long as some are on their way."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from kvtier.integrations import engine_routes
from kvtier.integrations.front import FRONT_ENV, Front, OnTheWay, make_front
from kvtier.integrations.model import prepare_default_model

from schedsim import Engine, scheduler, tokens


@pytest.fixture
def front_path() -> Iterator[str]:
    fd, path = make_front()
    try:
        yield path
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def model() -> str:
    return str(prepare_default_model())


def test_two_processes_share_the_counts(front_path: str) -> None:
    assert front_path.startswith(f"/proc/{os.getpid()}/fd/")
    api, engine = Front(front_path), Front(front_path)  # two mappings of one memory file
    on_the_way = OnTheWay(engine)
    assert on_the_way.pending() == 0
    api.received()
    api.received()
    api.received()
    api.refused()
    assert engine.counts() == (3, 1)
    on_the_way.given += 1
    assert on_the_way.pending() == 1
    on_the_way.forget()  # waited long enough for it: lost
    assert on_the_way.pending() == 0
    api.received()
    assert on_the_way.pending() == 1  # the next one counts again
    on_the_way.given += 3  # one HTTP request made three engine requests (n = 3)
    assert on_the_way.pending() == 0
    api.received()
    assert on_the_way.pending() == 1
    assert Front.from_env({}) is None
    assert Front.from_env({FRONT_ENV: "/proc/self/fd/100000"}) is None  # gone: no count


def test_the_middleware_counts_completions_and_the_refused(
    front_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        if body.get("bad"):
            return JSONResponse({"error": "bad request"}, status_code=400)
        return JSONResponse({"ok": True})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"data": []})

    monkeypatch.setenv(FRONT_ENV, front_path)
    engine_routes._front.cache_clear()  # looked up again, in this environment
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
        ]
    )
    app.add_middleware(BaseHTTPMiddleware, dispatch=engine_routes.forward)
    with TestClient(app) as client:
        assert client.post("/v1/chat/completions", json={}).status_code == 200
        assert client.post("/v1/completions", json={}).status_code == 200
        assert client.post("/v1/completions", json={"bad": 1}).status_code == 400
        assert client.get("/v1/models").status_code == 200  # not a completion: not counted
    engine_routes._front.cache_clear()
    assert Front(front_path).counts() == (3, 1)


def test_an_idle_engine_waits_for_the_requests_on_their_way_and_no_longer(
    model: str, front_path: str
) -> None:
    """Three hits of a burst: the API server has received them all, the engine is given the
    first. It waits (empty steps of 10 ms) until the other two are in, however long their
    handling took (here 60 ms, past the 5% of a step the engine waits without a count), and
    they share a step (its fixed cost, 0.6 s here, outweighs a hit's own tokens); a lone hit
    does not wait at all; one lost on its way holds the next burst at most ``gather_s``
    (100 ms here)."""
    engine = Engine(scheduler(model, hits_first=True), fixed_s=0.6)
    sched: Any = engine.sched
    sched.options = replace(sched.options, gather_s=0.1)
    api = Front(front_path)
    sched.on_the_way = OnTheWay(Front(front_path))
    history = tokens(81, 1500)
    api.received()
    engine.add(history)
    engine.run()
    for _ in range(3):
        api.received()
    first = engine.add(history + tokens(82, 40))
    empty = 0
    for _ in range(6):
        empty += engine.step() == 0
    second = engine.add(history + tokens(83, 40))
    third = engine.add(history + tokens(84, 40))
    engine.run()
    assert empty == 6  # it waited 60 ms for the other two
    assert engine.first_token[first] == engine.first_token[second] == engine.first_token[third]

    api.received()
    lone = engine.add(history + tokens(85, 40))
    assert engine.step() > 0  # nothing else on its way: no wait
    engine.run()
    assert engine.ttft(lone) < 0.8

    api.received()
    api.received()  # lost on its way: never given to the engine
    late = engine.add(history + tokens(86, 40))
    steps = 0
    while engine.step() == 0:
        steps += 1
    assert 9 <= steps <= 11  # gather_s (100 ms) of 10 ms empty steps, then it goes
    engine.run()
    api.received()
    engine.add(history + tokens(87, 40))
    assert engine.step() > 0  # the lost one is forgotten
    assert late in engine.first_token
