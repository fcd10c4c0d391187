"""The console's arithmetic, on Prometheus text as vLLM writes it (what the page shows from two
engines' scrapes), and when the router's console scrapes; the page itself is tested in a real
browser in test_pod.py."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from kvtier.console.app import Console
from kvtier.console.history import PREFIX, SERIES, History, Point
from kvtier.console.scrape import Scrape, ScrapeError
from kvtier.redis_process import free_port


def page(
    requested: float,
    prefix: float,
    disk: float,
    read: float,
    saved: float,
    up: float = 1.0,
    ttft: tuple[float, float, float] = (0, 0, 0),
) -> Scrape:
    labels = 'engine="0",model_name="m"'
    return Scrape.parse(f"""\
# TYPE kvtier:requested_tokens counter
kvtier:requested_tokens_total{{{labels}}} {requested}
# TYPE kvtier:vllm_prefix_tokens counter
kvtier:vllm_prefix_tokens_total{{{labels}}} {prefix}
# TYPE kvtier:prefill_seconds_saved counter
kvtier:prefill_seconds_saved_total{{{labels}}} {saved}
# TYPE kvtier:tier_loaded_tokens counter
kvtier:tier_loaded_tokens_total{{{labels},tier="disk"}} {disk}
# TYPE kvtier:tier_bytes_read counter
kvtier:tier_bytes_read_total{{{labels},tier="disk"}} {read}
# TYPE kvtier:tier_up gauge
kvtier:tier_up{{{labels},tier="disk"}} {up}
kvtier:tier_up{{{labels},tier="memory"}} 1
# TYPE kvtier:tier_used_bytes gauge
kvtier:tier_used_bytes{{{labels},tier="disk"}} 1000
kvtier:tier_used_bytes{{{labels},tier="memory"}} 500
# TYPE kvtier:tier_capacity_bytes gauge
kvtier:tier_capacity_bytes{{{labels},tier="memory"}} 2000
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{labels}}} 2
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{{labels},le="0.1"}} {ttft[0]}
vllm:time_to_first_token_seconds_bucket{{{labels},le="1.0"}} {ttft[1]}
vllm:time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} {ttft[2]}
vllm:time_to_first_token_seconds_count{{{labels}}} {ttft[2]}
vllm:time_to_first_token_seconds_sum{{{labels}}} 3.0
""")


def test_hit_rate_per_tier_is_tokens_loaded_over_tokens_looked_up_in_each_interval() -> None:
    history = History()
    history.add(Point(100.0, {"a": page(1000, 100, 200, 4096, 1.0), "b": page(0, 0, 0, 0, 0.0)}))
    history.add(Point(102.0, {"a": page(2000, 300, 700, 8192, 2.5), "b": page(1000, 0, 0, 0, 0.0)}))
    view = history.view()
    assert view["t"] == [102.0]
    # 2000 tokens looked up in the interval: 200 from vLLM's prefix cache, 500 from disk.
    assert view["hit_rate"][PREFIX] == [0.1]
    assert view["hit_rate"]["disk"] == [0.25]
    assert view["bytes_per_s"]["disk read"] == [2048.0]
    assert view["saved_s"] == [2.5]
    totals = view["totals"]
    assert totals["requested_tokens"] == 3000 and totals["loaded_tokens"] == {"disk": 700}
    assert totals["hit_rate"] == pytest.approx((300 + 700) / 3000)


def test_an_engine_restart_counts_from_zero_and_an_idle_interval_has_no_rate() -> None:
    history = History()
    history.add(Point(0.0, {"a": page(5000, 0, 1000, 0, 9.0)}))
    history.add(Point(2.0, {"a": page(400, 0, 100, 0, 0.5)}))  # restarted: counters reset
    history.add(Point(4.0, {"a": page(400, 0, 100, 0, 0.5)}))  # nothing happened
    assert history.view()["hit_rate"]["disk"] == [0.25, None]


def test_a_down_engine_and_a_down_tier_show_as_such() -> None:
    history = History()
    history.add(Point(0.0, {"a": page(10, 0, 0, 0, 0, up=0.0), "b": None}, {"b": "refused"}))
    view = history.view()
    engines = {e["url"]: e for e in view["engines"]}
    assert engines["a"]["up"] and engines["a"]["running"] == 2
    assert not engines["b"]["up"] and engines["b"]["error"] == "refused"
    tiers = {t["tier"]: t for t in view["tiers"]}
    assert tiers["disk"]["up"] == 0 and tiers["disk"]["capacity_bytes"] is None
    assert tiers["memory"]["used_bytes"] == 500 and tiers["memory"]["capacity_bytes"] == 2000


def tenant_page(used: float, evicted: float) -> Scrape:
    labels = 'engine="0",model_name="m"'
    return Scrape.parse(f"""\
# TYPE kvtier:tenant_requested_tokens counter
kvtier:tenant_requested_tokens_total{{{labels},tenant="acme"}} 1000
kvtier:tenant_requested_tokens_total{{{labels},tenant="globex"}} 500
# TYPE kvtier:tenant_loaded_tokens counter
kvtier:tenant_loaded_tokens_total{{{labels},tenant="acme"}} 600
# TYPE kvtier:tenant_vllm_prefix_tokens counter
kvtier:tenant_vllm_prefix_tokens_total{{{labels},tenant="acme"}} 100
# TYPE kvtier:tenant_tier_used_bytes gauge
kvtier:tenant_tier_used_bytes{{{labels},tenant="acme",tier="memory"}} {used}
kvtier:tenant_tier_used_bytes{{{labels},tenant="globex",tier="memory"}} 10
# TYPE kvtier:tenant_tier_share_bytes gauge
kvtier:tenant_tier_share_bytes{{{labels},tenant="acme",tier="memory"}} 1000
kvtier:tenant_tier_share_bytes{{{labels},tenant="globex",tier="memory"}} 1000
# TYPE kvtier:tenant_tier_evictions counter
kvtier:tenant_tier_evictions_total{{{labels},tenant="acme",tier="memory"}} {evicted}
""")


def test_each_tenants_hits_and_part_of_the_tiers_add_up_over_engines() -> None:
    history = History()
    history.add(Point(0.0, {"a": tenant_page(400, 3), "b": tenant_page(200, 1)}))
    rows = {r["tenant"]: r for r in history.view()["tenants"]}
    assert set(rows) == {"acme", "globex"}
    acme = rows["acme"]
    assert acme["requested_tokens"] == 2000 and acme["hit_rate"] == pytest.approx(0.7)
    assert acme["tiers"]["memory"] == {"used_bytes": 600, "share_bytes": 2000, "evictions": 4}
    assert (
        rows["globex"]["hit_rate"] == 0.0 and rows["globex"]["tiers"]["memory"]["used_bytes"] == 20
    )
    assert History().view()["tenants"] == []  # a server without tenants: no rows


def test_ttft_buckets_become_counts_per_bucket_over_all_engines() -> None:
    history = History()
    history.add(
        Point(
            0.0,
            {"a": page(0, 0, 0, 0, 0, ttft=(1, 3, 4)), "b": page(0, 0, 0, 0, 0, ttft=(0, 2, 2))},
        )
    )
    ttft = history.view()["ttft"]
    assert ttft["le"] == [0.1, 1.0, None]  # None: +Inf (JSON has no infinity)
    assert ttft["counts"] == [1, 4, 1] and ttft["count"] == 6 and ttft["mean_s"] == 1.0


def test_a_page_that_is_not_prometheus_text_is_named_as_such() -> None:
    with pytest.raises(ScrapeError, match="not Prometheus text"):
        Scrape.parse("<html>this is not it</html>\n{")


def test_only_the_series_the_console_reads_are_parsed_and_nan_is_left_out() -> None:
    text = """\
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0"} 0.5
# TYPE kvtier:tier_up gauge
kvtier:tier_up{tier="disk"} 1
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0"} 3
# TYPE kvtier:router_overhead_seconds gauge
kvtier:router_overhead_seconds{quantile="0.5"} NaN
"""
    scrape = Scrape.parse(text, SERIES)
    assert set(scrape.samples) == {"kvtier:tier_up", "vllm:num_requests_running"}
    assert Scrape.parse(text).total("vllm:gpu_cache_usage_perc") == 0.5  # all, unfiltered


def test_the_router_console_scrapes_only_while_watched_and_starts_afresh_after_a_pause() -> None:
    """A Console as the router mounts it (``linger_s``), over real HTTP: an engine page that
    counts its scrapes, the console's own app, a viewer polling its data."""
    scrapes = 0

    async def engine_metrics(request: web.Request) -> web.Response:
        nonlocal scrapes
        scrapes += 1
        return web.Response(text=f"kvtier:requested_tokens_total {scrapes * 100}\n")

    async def scenario() -> None:
        engine, console_app = web.Application(), web.Application()
        engine.router.add_get("/metrics", engine_metrics)
        port, console_port = free_port(), free_port()
        console = Console([f"http://127.0.0.1:{port}/metrics"], interval_s=0.1, linger_s=0.5)
        console.mount(console_app)
        runners = [web.AppRunner(engine), web.AppRunner(console_app)]
        for runner, p in zip(runners, (port, console_port), strict=True):
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", p).start()
        data = f"http://127.0.0.1:{console_port}/console/api/data"
        try:
            async with aiohttp.ClientSession() as session:
                await asyncio.sleep(0.5)
                assert scrapes == 0  # nobody watched yet
                async with session.get(data) as r:
                    first = await r.json()
                assert first["totals"]["requested_tokens"] == 100  # scraped for this look
                # every interval while watched: a viewer polling keeps it watched (a loaded
                # CI host once stalled this process for most of one 0.5 s linger)
                for _ in range(25):
                    if scrapes >= 3:
                        break
                    async with session.get(data) as r:
                        await r.json()
                    await asyncio.sleep(0.2)
                assert scrapes >= 3
                await asyncio.sleep(1.0)  # past the linger: the scraping stops
                stopped = scrapes
                await asyncio.sleep(0.5)
                assert scrapes == stopped
                async with session.get(data) as r:
                    back = await r.json()
                assert back["t"] == []  # a new history: no interval spanning the pause
                assert back["totals"]["requested_tokens"] == 100 * scrapes
        finally:
            for runner in runners:
                await runner.cleanup()

    asyncio.run(scenario())
