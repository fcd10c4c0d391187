"""`kvtier pod` end to end: two real engines, a real redis-server, a real SeaweedFS (`--s3
local`) and the router, over HTTP.

One pod serves every test here, in order (the last one stops it with SIGINT, as Ctrl-C does).
The disaggregated pod: tests/e2e/test_pod_pd.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvtier import codec
from kvtier.codec import Compression
from kvtier.integrations.engine_layout import parse_cpu_list
from kvtier.integrations.model import prepare_default_model
from kvtier.keys import ChunkKey, Namespace, chunk_keys
from kvtier.redis_process import free_port
from kvtier.router.prompts import Prompter
from kvtier.seaweed_process import PROFILE
from kvtier.tier_config import s3_location
from kvtier.tiers import RedisTier, S3Tier
from kvtier.tiers.s3_client import S3Client
from kvtier.tiers.s3_credentials import load_credentials

from browser import Page, chromium_page
from hostspeed import patience, words_for
from pods import (
    MODEL,
    NOT_UP,
    README,
    PodProcess,
    as_run,
    complete,
    engine_pids,
    get_json,
    post,
    readme_line,
    readme_pod,
    text,
    wait_for,
)

pytestmark = pytest.mark.slow
# Each user's context in the routing test: ~1,000-1,300 tokens, 4 chunks and more, enough for
# the holder to win over a load from the shared tier, little enough to stay seconds of a core.
CONTEXT_WORDS = 140  # 500-650 tokens: two 256-token chunks and a tail


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodProcess]:
    # Every engine's shared tier stores int8 (`kvtier pod --codec`; forced: the gate's
    # records are the tests' own, empty).
    codec = ("--codec", "redis=int8", "--force-codec")
    # The README's pod line with an object tier: a private SeaweedFS the pod starts and stops.
    line = "kvtier pod --engines 2 --engine-port 8001 --s3 local"
    with readme_pod(tmp_path_factory, line, "--max-model-len", "8192", *codec) as started:
        yield started


def test_the_readme_router_alone_serves_through_the_pods_engines(pod: PodProcess) -> None:
    port = free_port()
    command = as_run(readme_line("kvtier router"), pod.engine_port, port)
    router = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"

        def synced() -> bool:
            assert router.poll() is None, router.stderr.read() if router.stderr else ""
            try:
                engines = get_json(f"{url}/router/state")["engines"]
            except NOT_UP:
                return False
            return all(e["healthy"] and e["synced"] for e in engines)

        wait_for(synced, 60, "the README's router to reach the pod's engines")
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8}
        reply, engine = post(url, "/v1/completions", body)
        assert reply["choices"][0]["text"]
        assert engine in pod.engines()
    finally:
        router.terminate()
        router.wait(30)


def test_router_keys_are_the_engines_keys(pod: PodProcess) -> None:
    prompter = Prompter(prepare_default_model())
    cases: list[tuple[str, dict[str, Any], str | None]] = [
        ("/v1/completions", {"prompt": text("keys-completion", 90)}, None),
        ("/v1/completions", {"prompt": text("keys-completion", 90)}, "tenant-a"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": text("keys-chat", 90)},
                ]
            },
            None,
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": text("keys-chat", 90)}]},
            "tenant-b",
        ),
    ]
    seen: set[bytes] = set()
    for path, body, salt in cases:
        request = {"model": MODEL, "max_tokens": 1, **body}
        if salt:
            request["cache_salt"] = salt
        _, engine = post(pod.url, path, request)
        info = get_json(f"{engine}/kvtier/info")
        namespace = Namespace(**info["namespace"], tenant_salt=salt)
        keys = chunk_keys(prompter.tokens(path, body), namespace, info["chunk_tokens"])
        assert len(keys) >= 2  # 90 words: 530-620 tokens, two chunks and a tail
        assert seen.isdisjoint(keys), "a salt or a chat template must change the keys"
        seen.update(keys)

        def stored(engine: str = engine, keys: list[ChunkKey] = keys) -> bool:
            held = set(get_json(f"{engine}/kvtier/snapshot")["entries"]["memory"])
            return all(k.hex() in held for k in keys)

        wait_for(stored, 10, f"{path} (salt {salt}) keys in {engine}'s DRAM")

        # vLLM's own KV events, keyed by the router, name the same chunks on that engine.
        def in_vllm(engine: str = engine, keys: list[ChunkKey] = keys) -> bool:
            where = get_json(f"{pod.url}/router/chunks?keys={','.join(k.hex() for k in keys)}")
            return all("gpu" in where[k.hex()].get(engine, ()) for k in keys)

        wait_for(in_vllm, 10, f"{path} (salt {salt}) keys in {engine}'s vLLM cache")


def test_returning_turns_go_where_their_context_is(pod: PodProcess) -> None:
    first = {}
    for user in ("ann", "bob", "cyd", "dee"):
        _, first[user] = complete(pod, text(user, CONTEXT_WORDS))
    engines = [
        {k: e[k] for k in ("url", "queued_tokens", "routed", "prefill_tokens_per_s")}
        for e in get_json(f"{pod.url}/router/state")["engines"]
    ]
    assert len(set(first.values())) == 2, f"cold users all went to one engine: {first}, {engines}"
    for user in ("ann", "bob", "cyd", "dee"):
        body = {"model": MODEL, "prompt": text(user, CONTEXT_WORDS) + " and then", "max_tokens": 1}
        _, engine = post(pod.url, "/v1/completions", body)
        assert engine == first[user], f"{user}'s second turn left the engine holding it"
    # The router's /metrics says so too, beside each engine's state.
    with urllib.request.urlopen(f"{pod.url}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    hits = re.search(r'^kvtier:router_decisions_total\{reason="engine hit"\} (\S+)$', metrics, re.M)
    assert hits and float(hits.group(1)) >= 4, metrics
    up = re.findall(r'^kvtier:router_engine_up\{[^}]*role="serve"\} (\S+)$', metrics, re.M)
    assert up == ["1.0", "1.0"], metrics
    assert re.search(r'^kvtier:router_index_chunks_held\{[^}]*tier="gpu"\} [1-9]', metrics, re.M)


def test_the_shared_tier_holds_the_pods_codec(pod: PodProcess) -> None:
    """`kvtier pod --codec redis=int8`: the chunks an engine wrote to the shared tier are int8
    (about a fourth of fp32's bytes, half of bf16's). Every other test of this module runs on
    this pod, its shared tier int8."""
    body = {"prompt": text("codec", 200)}  # ~800 tokens: three chunks and a tail
    _, engine = post(pod.url, "/v1/completions", {"model": MODEL, "max_tokens": 1, **body})
    info = get_json(f"{engine}/kvtier/info")
    tokens = Prompter(prepare_default_model()).tokens("/v1/completions", body)
    keys = chunk_keys(tokens, Namespace(**info["namespace"]), info["chunk_tokens"])
    # The pod's redis-server has an ACL user of its own (GET, SET and little more): its name
    # and password file are in every engine's kvtier configuration (the password in none).
    words = Path(f"/proc/{engine_pids(engine)[0]}/cmdline").read_bytes().split(b"\0")
    config = json.loads(words[words.index(b"--kv-transfer-config") + 1])
    tiers = config["kv_connector_extra_config"]["tiers"]
    redis_tier = next(t for t in tiers if t.get("kind") == "redis")
    shared = RedisTier(
        pod.state()["shared"],
        username=redis_tier["username"],
        password_file=redis_tier["password_file"],
    )
    try:
        wait_for(lambda: all(shared.contains_many(keys)), 60, "the chunks in the shared tier")
        headers = [codec.read_header(b) for b in shared.get_many(keys) if b is not None]
        assert len(headers) == len(keys) >= 2
        assert {h.compression for h in headers} == {Compression.INT8}, headers
        assert all(h.stored_bytes < 0.55 * h.raw_bytes for h in headers)
    finally:
        shared.close()


def object_tier(pod: PodProcess) -> S3Tier:
    """The pod's object tier (`--s3 local`), as any engine sees it: the URL the pod printed,
    the keys in the file its engines are told of (``<state>/s3/credentials``)."""
    found = re.search(r"object tier (http://\S+) \(a private SeaweedFS", pod.log.read_text())
    assert found, pod.log.read_text()[-2000:]
    where = s3_location(found.group(1))
    keys = load_credentials(PROFILE, str(pod.log.parent / "s3" / "credentials"))
    client = S3Client(where["endpoint"], where["bucket"], "us-east-1", keys)
    return S3Tier(client, 1 << 40, prefix="kvtier", read_only=True)


def test_every_engine_writes_to_the_pods_object_tier(pod: PodProcess) -> None:
    """`kvtier pod --s3 local`: a private SeaweedFS on loopback; each engine lists it among its
    tiers (kind "object" for the router) and uploads what it computes, behind its answers."""
    body = {"prompt": text("objects", 200)}  # ~800 tokens: three chunks and a tail
    _, engine = post(pod.url, "/v1/completions", {"model": MODEL, "max_tokens": 1, **body})
    info = get_json(f"{engine}/kvtier/info")
    assert {"name": "s3", "kind": "object"} in info["tiers"], info["tiers"]
    tokens = Prompter(prepare_default_model()).tokens("/v1/completions", body)
    keys = chunk_keys(tokens, Namespace(**info["namespace"]), info["chunk_tokens"])
    bucket = object_tier(pod)
    try:
        wait_for(lambda: all(bucket.contains_many(keys)), 60, "the chunks in the object tier")
        heads = [codec.read_header(b) for b in bucket.get_many(keys) if b is not None]
        assert len(heads) == len(keys) >= 2 and all(h.tokens > 0 for h in heads)
        listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        weed = [ln for ln in listening.splitlines() if '"weed"' in ln]
        assert weed and all("127.0.0.1:" in ln.split()[3] for ln in weed), weed  # loopback only
    finally:
        bucket.close()


def allowed_cores(pid: str) -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    listed = re.search(r"^Cpus_allowed_list:\s*(\S+)$", status, re.M)
    assert listed, status
    return set(parse_cpu_list(listed.group(1)))


def test_each_engine_computes_in_its_engine_core_on_its_own_cores(pod: PodProcess) -> None:
    """kvtier pod gives each engine its cores; the model runs inside the engine-core process
    there (no worker process to start), bound to them, and the API server answers on any."""
    everywhere = os.sched_getaffinity(0)
    bound = []
    for url in pod.engines():
        [api] = engine_pids(url)
        children = subprocess.run(["pgrep", "-P", api], capture_output=True, text=True)
        names = {
            pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in children.stdout.split()
        }
        cores = [allowed_cores(pid) for pid, name in names.items() if name.startswith("VLLM::")]
        assert len(cores) == 1 and "VLLM::EngineCor" in names.values(), names  # 15 characters
        assert not any(pgrep_children(pid) for pid in names), "a worker process under it"
        assert allowed_cores(api) == everywhere
        bound.append(cores[0])
    assert all(len(c) == len(everywhere) // 2 for c in bound) and not bound[0] & bound[1], bound


def pgrep_children(pid: str) -> list[str]:
    """The processes ``pid`` started that are vLLM's (its resource tracker is not)."""
    found = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True).stdout.split()
    return [c for c in found if Path(f"/proc/{c}/comm").read_text().startswith("VLLM::")]


def test_a_burst_of_cold_prompts_is_spread(pod: PodProcess) -> None:
    engines: list[str] = []

    def send(i: int) -> None:
        body = {"model": MODEL, "prompt": text(f"burst{i}", 120), "max_tokens": 1}
        engines.append(post(pod.url, "/v1/completions", body)[1])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = {e: engines.count(e) for e in set(engines)}
    assert len(engines) == 6 and min(counts.values()) >= 2, counts


def metric_sum(urls: list[str], name: str) -> float:
    """The sum of samples ``name`` on each of ``urls`` (Prometheus text)."""
    total = 0.0
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as r:
            found = re.findall(
                rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", r.read().decode(), re.M
            )
        total += sum(float(v) for v in found)
    return total


PAGE_NUMBERS = (
    "Object.fromEntries([...document.querySelectorAll('[data-key]')]"
    ".map(e => [e.dataset.key, e.dataset.value]))"
)
NUMBERS = ("requested_tokens", "lookups", "hit_tokens", "prefill_seconds_saved")


def numbers_match(page: Page, metrics: list[str]) -> bool:
    """The console's totals are the engines' /metrics (stable: no traffic now)."""
    shown = page.evaluate(PAGE_NUMBERS)
    return all(
        abs(float(shown.get(f"totals.{n}") or "nan") - metric_sum(metrics, f"kvtier:{n}_total"))
        < 1e-6
        for n in NUMBERS
    )


def first_visit_ms(page: Page) -> float:
    """The page's first render (ms from navigation) in the running browser, cache off."""
    page.wait_for("document.body && +document.body.dataset.renders >= 1", 60, "a first render")
    page.call("Network.enable")
    page.call("Network.setCacheDisabled", cacheDisabled=True)
    page.call("Page.reload", ignoreCache=True)
    reloaded = "performance.getEntriesByType('navigation')[0].type === 'reload'"
    rendered = "document.body && +document.body.dataset.renders >= 1"
    page.wait_for(f"{reloaded} && {rendered}", 60, "the reload's render")
    return float(page.evaluate("document.body.dataset.firstRenderMs"))


def test_the_console_shows_the_pods_metrics_live_in_chromium(
    pod: PodProcess, tmp_path: Path
) -> None:
    body = {
        "model": MODEL,
        "prompt": text("console", 100),
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        pod.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as r:  # a stream, its usage asked for
        assert b"cached_tokens" in r.read()
    metrics = [f"{e}/metrics" for e in pod.engines()]
    for engine in pod.engines():  # each engine runs a step (and reports its tiers)
        post(engine, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 1})
    stop = threading.Event()
    turns: list[str] = []

    def users() -> None:  # returning turns of three users while the page is watched
        for turn in range(40):
            if stop.is_set():
                return
            user = ("ann", "bob", "cyd")[turn % 3]
            complete(pod, text(f"console-{user}", 100) + " more" * (turn // 3))
            turns.append(user)

    traffic = threading.Thread(target=users)
    traffic.start()
    try:
        with chromium_page(pod.url + "/console/") as page:
            first_ms = first_visit_ms(page)
            print(f"the console's first render: {first_ms:.0f} ms")
            assert first_ms < 1000, f"first render took {first_ms:.0f} ms"
            page.wait_for(
                "+document.getElementById('hit').dataset.points >= 5",
                60,
                "the charts to hold five intervals of live data",
            )
            wait_for(lambda: len(turns) >= 6, patience(60), "every user's second turn")
            stop.set()
            traffic.join()
            wait_for(lambda: numbers_match(page, metrics), 20, "the page's numbers to be /metrics'")
            shown = page.evaluate(PAGE_NUMBERS)
            assert float(shown["totals.hit_rate"]) > 0, shown  # the returning turns'
            # The router's part: decisions by reason as on its /metrics, and routing precision.
            router = [f"{pod.url}/metrics"]
            hits = metric_sum(router, 'kvtier:router_decisions_total{reason="engine hit"}')
            assert float(shown["reasons.engine hit"]) == hits > 0, shown
            reuse = pod.state()["reuse"]
            assert reuse["measured"] > 0 and 0 < reuse["precision"] <= 1, reuse
            page_precision = page.evaluate(PAGE_NUMBERS)["routing.reuse.precision"]
            assert float(page_precision) == pytest.approx(reuse["precision"]), page_precision
            assert page.evaluate("document.querySelectorAll('#recent tbody tr').length") > 0
            tiers = page.evaluate(
                "[...document.querySelectorAll('#tiers tbody tr')]"
                ".map(r => r.children[2].textContent)"
            )
            # memory, disk, the shared redis and the object tier (`--s3 local`), per engine
            assert tiers == ["up"] * 8, tiers
            names = page.evaluate(
                "[...document.querySelectorAll('#tiers tbody tr')]"
                ".map(r => r.children[1].textContent)"
            )
            assert names.count("s3") == 2, names
            # Stored bytes per raw byte written, per tier: DRAM raw, the shared tier int8
            # (`kvtier pod --codec redis=int8`: ~0.26 of fp32, ~0.52 of bf16), tokens held.
            ratios: dict[str, list[float]] = {}
            for key, value in shown.items():
                if key.endswith(".stored_ratio") and value != "null":
                    ratios.setdefault(key.rsplit(".", 2)[1], []).append(float(value))
            assert ratios["memory"] and all(r == pytest.approx(1.0) for r in ratios["memory"])
            assert ratios["redis"] and all(0.2 < r < 0.55 for r in ratios["redis"]), ratios
            held = [float(v) for k, v in shown.items() if k.endswith(".memory.tokens")]
            assert held and all(n > 0 for n in held), shown
            shot = Path(os.environ.get("CONSOLE_SCREENSHOT") or tmp_path / "console.png")
            page.screenshot(shot)
            assert shot.stat().st_size > 20_000
    finally:
        stop.set()
        traffic.join()

    # `kvtier console` for one engine, as the README runs it.
    port = free_port()
    line = readme_line("kvtier console").replace("8000", pod.engines()[0].rsplit(":", 1)[1])
    command = [*as_run(line, 0, port), "--port", str(port)]
    with subprocess.Popen(command, stderr=subprocess.PIPE) as proc:
        try:

            def listening() -> bool:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                try:
                    return bool(get_json(f"http://127.0.0.1:{port}/console/api/data"))
                except NOT_UP:
                    return False

            wait_for(listening, 60, "kvtier console to listen")
            with chromium_page(f"http://127.0.0.1:{port}/console/") as page:
                page.wait_for(
                    "+document.getElementById('hit').dataset.points >= 1",
                    30,
                    "the single engine's console to chart",
                )
                wait_for(lambda: numbers_match(page, metrics[:1]), 20, "its numbers")
                assert page.evaluate("document.getElementById('routing-panel').hidden")
        finally:
            proc.terminate()


def test_the_grafana_dashboard_and_monitoring_doc_name_series_the_pod_serves(
    pod: PodProcess,
) -> None:
    docs = README.parent / "docs"
    dashboard = json.loads((docs / "grafana-kvtier.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", ()))
    guide = (docs / "monitoring.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", guide, re.S)
    assert block, "no YAML block in docs/monitoring.md"
    scrape = yaml.safe_load(block.group(1))
    assert [job["job_name"] for job in scrape["scrape_configs"]] == [
        "kvtier-engines",
        "kvtier-router",
    ]
    complete(pod, text("dashboard", 100))  # a routed request; and a step on each engine:
    for engine in pod.engines():
        post(engine, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 1})
    found = re.findall(r"\b(?:kvtier|vllm):[a-z_]+", exprs + guide)
    names = {n for n in found if not n.endswith("_")}  # not the doc's `kvtier:router_*`
    names.discard("kvtier:router_prefill_decisions_total")  # a disaggregated pod's only
    # A server with --tenants only: tests/e2e/test_pod_tenants.py and test_serve_quotas.py.
    names = {n for n in names if not n.startswith("kvtier:tenant_")}
    assert len(names) > 30, names
    missing: list[str] = []

    def served() -> bool:
        pages = ""
        for url in [*pod.engines(), pod.url]:
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
                pages += r.read().decode()
        missing[:] = [
            name
            for name in sorted(names)
            if not re.search(rf"^{re.escape(name)}(?:_bucket|_total)?[{{ ]", pages, re.M)
        ]
        return not missing

    with contextlib.suppress(AssertionError):
        wait_for(served, 20, "every series to be served")
    assert not missing, f"no such series on the pod's /metrics: {missing}"


def fuzz_requests(count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """Malformed (and some well-formed) requests: (path, raw body)."""
    rng = random.Random(seed)
    salts: list[Any] = [7, ["x"], {"a": 1}, "", "a/b", "at@x", "x" * 200, True, 1.5, "ok", None]
    prompts: list[Any] = ["Hello there", 7, [1, 2, 3], [[1]], [-1], None, {"x": 1}, "", ["a", 3]]
    messages: list[Any] = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user"}],
        [{"content": 5}],
        "hello",
        [None],
        [],
        [{"role": "user", "content": [{"type": "text", "text": 3}]}],
    ]
    # Never absent: a well-formed request without max_tokens generates up to the model's
    # length (minutes on a loaded CI host).
    maxes: list[Any] = [1, 2, 0, -1, "2", 10**9, 1.5]
    raw = [b"{", b"[]", b'"text"', b"12", b"null", b"\xff\xfe", b"", b'{"model": }']
    for i in range(count):
        path = rng.choice(("/v1/completions", "/v1/chat/completions"))
        if i % 10 == 0:
            yield path, rng.choice(raw)
            continue
        if i % 10 == 5:  # well formed: answered
            well: dict[str, Any] = {"model": MODEL, "max_tokens": 2, "cache_salt": "ok"}
            if path == "/v1/completions":
                well["prompt"] = "Hello there"
            else:
                well["messages"] = [{"role": "user", "content": "Hi"}]
            yield path, json.dumps(well).encode()
            continue
        body: dict[str, Any] = {"model": rng.choice([MODEL, MODEL, 5, "no-such-model"])}
        if path == "/v1/completions":
            body["prompt"] = rng.choice(prompts)
        else:
            body["messages"] = rng.choice(messages)
        for field, choices in (("cache_salt", salts), ("max_tokens", maxes)):
            value = rng.choice(choices)
            if value is not None:
                body[field] = value
        if rng.random() < 0.2:
            body["stream"] = rng.choice([True, "yes", 1])
        yield path, json.dumps(body).encode()


def test_malformed_requests_get_4xx_from_the_router_never_5xx(pod: PodProcess) -> None:
    """300 malformed requests through the router (bad JSON, a cache_salt that is not a string
    or breaks vLLM's rule, bad prompts, messages, models, max_tokens): whatever the engine
    refuses with 400, the router refuses with 4xx too, and nothing answers 5xx. One in ten is
    well formed and must be answered: the test would see a router that refused everything."""
    host, port = pod.url.split("//")[1].split(":")
    statuses: dict[int, int] = {}
    failures = []
    for path, body in fuzz_requests(300, seed=23):
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
        finally:
            conn.close()
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
        if reply.status >= 500:
            failures.append((reply.status, path, body[:200]))
    assert not failures, f"{len(failures)} answered 5xx, for example {failures[:3]}"
    assert statuses.get(200, 0) >= 30 and statuses.get(400, 0) >= 100, statuses
    # The one the issue found: a salt that is not a string is refused by the router itself.
    salted: dict[str, Any] = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "cache_salt": 7}
    with pytest.raises(urllib.error.HTTPError) as refused:
        post(pod.url, "/v1/completions", salted)
    assert refused.value.code == 400
    reply = json.load(refused.value)
    assert reply["error"]["type"] == "router_error" and "cache_salt" in reply["error"]["message"]


def test_a_killed_engine_fails_no_request_and_resyncs_when_back(pod: PodProcess) -> None:
    victim = pod.engines()[1]
    resyncs = pod.state()["index"]["resyncs"].get(victim, 0)
    pids = engine_pids(victim)
    assert pids, f"no process serves {victim}"
    errors: list[str] = []
    answered: list[str] = []
    # Long enough to be in flight a second after they are sent, wherever they queue (~6 s of
    # one core each: 700 words on the fastest hosts, 100 on an AVX2-only one in fp32).
    words = words_for(6.0, low=100, high=700)

    def send(i: int) -> None:
        body = {"model": MODEL, "prompt": text(f"kill{i}", words), "max_tokens": 1}
        try:
            answered.append(post(pod.url, "/v1/completions", body)[1])
        except (urllib.error.URLError, OSError) as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the requests are being computed
    killed = time.monotonic()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGKILL)

    def out() -> bool:
        return not next(e for e in pod.state()["engines"] if e["url"] == victim)["healthy"]

    wait_for(out, 5, "the router to take the dead engine out")
    assert time.monotonic() - killed < 2.0
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(answered) == 4
    _, engine = complete(pod, text("after-kill", 100))
    assert engine != victim

    # The pod restarts it; the router resyncs its index from the restarted engine's feed,
    # which lists what its disk tier kept.
    def back() -> bool:
        state = pod.state()
        engine = next(e for e in state["engines"] if e["url"] == victim)
        return bool(engine["healthy"] and state["index"]["resyncs"].get(victim, 0) > resyncs)

    wait_for(back, patience(300), "the killed engine to be restarted and resynced")
    assert pod.state()["index"]["per_engine"][victim].get("disk", 0) > 0


def test_the_shared_tier_down_costs_no_request(pod: PodProcess) -> None:
    url = pod.state()["shared"]
    port = url.rsplit(":", 1)[1].split("/")[0]
    subprocess.run(["pkill", "-f", f"redis-server.*{port}"], check=True)
    for i in range(3):
        body = {"model": MODEL, "prompt": text(f"noredis{i}", 100), "max_tokens": 2}
        reply, _ = post(pod.url, "/v1/completions", body)
        assert reply["choices"][0]["text"]


def test_ctrl_c_stops_every_process_of_the_pod(pod: PodProcess) -> None:
    sessions = [pid for url in pod.engines() for pid in engine_pids(url)]
    assert len(sessions) == 2
    weed = subprocess.run(
        ["pgrep", "-f", f"weed server.*{pod.log.parent / 's3'}"], capture_output=True, text=True
    ).stdout.split()
    assert len(weed) == 1  # the pod's SeaweedFS (a session of its own: it stops it last)
    pod.proc.send_signal(signal.SIGINT)
    pod.proc.wait(120)
    assert "stopping engines" in pod.log.read_text()

    # The pod's own session (its redis-server), and each engine's (vLLM's engine processes).
    def gone() -> bool:
        for session in [str(pod.proc.pid), *sessions, *weed]:
            left = subprocess.run(["pgrep", "-s", session], capture_output=True, text=True)
            if left.stdout.split():
                return False
        return True

    wait_for(gone, 10, "every process of the pod to exit")
