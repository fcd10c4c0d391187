"""`kvtier pod --prefill` end to end: a prefill engine, a decode engine, a real redis-server
and the router, over HTTP. A file of its own, so that it runs beside tests/e2e/test_pod.py when the
suite runs in several processes."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from pods import MODEL, PodProcess, get_json, post, readme_pod, text, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pd_pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodProcess]:
    # The README's disaggregated pod, in fp32 so that greedy outputs compare exactly.
    options = ("--max-model-len", "4096", "--dtype", "float32")
    with readme_pod(tmp_path_factory, "kvtier pod --prefill", *options) as started:
        yield started
        started.proc.send_signal(signal.SIGINT)
        started.proc.wait(120)


class Stream:
    """A user decoding through the router until stopped (closing the stream aborts it)."""

    def __init__(self, base: str):
        body = {
            "model": MODEL,
            "prompt": "Count slowly: one, two,",
            "max_tokens": 3000,
            "ignore_eos": True,
            "stream": True,
        }
        request = urllib.request.Request(
            base + "/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        self.response = urllib.request.urlopen(request, timeout=300)
        self.engine = self.response.headers.get("x-kvtier-engine", "")
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read)
        self._thread.start()

    def _read(self) -> None:
        for line in self.response:
            if self._stop.is_set():
                break
            self.events += line.startswith(b"data:")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self.response.close()


def test_disaggregated_prefill_decodes_what_one_engine_computes(pd_pod: PodProcess) -> None:
    roles = {e["role"]: e["url"] for e in pd_pod.state()["engines"]}
    decode, prefill = roles["serve"], roles["prefill"]
    stream = Stream(pd_pod.url)  # nothing runs yet: it starts on the decode engine itself
    try:
        assert stream.engine == decode
        wait_for(lambda: stream.events > 3, 60, "the stream to decode")
        # 1,150 tokens: four 256-token chunks and a tail
        messages = [{"role": "user", "content": text("pd", 250) + " Which item came last?"}]
        request = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0}
        # A cold prompt with a stream running on the decode engine: prefilled elsewhere.
        split, engine = post(pd_pod.url, "/v1/chat/completions", request)
        assert engine == decode
        decisions = pd_pod.state()["decisions"]
        assert decisions.get("prefill engine") == 1, decisions
        reads = get_json(f"{decode}/kvtier/info")["reads"]
        assert reads["redis"]["hits"] >= 3, reads  # the prompt came from the shared tier
        held = get_json(f"{prefill}/kvtier/snapshot")["entries"]["memory"]
        assert len(held) >= 3, "the prefill engine kept no chunk"
        # The same prompt again: the decode engine holds it all, the hop is not worth it.
        again, engine = post(pd_pod.url, "/v1/chat/completions", request)
        assert engine == decode
        decisions = pd_pod.state()["decisions"]
        assert decisions.get("prefill engine") == 1 and decisions.get("prefill skipped"), decisions
        assert stream.events > 3 and pd_pod.state()["engines"][0]["in_flight"] >= 1
    finally:
        stream.stop()
    # One engine computing the request from scratch (a salt makes every chunk a miss).
    alone, _ = post(decode, "/v1/chat/completions", {**request, "cache_salt": "colocated"})
    want = alone["choices"][0]["message"]["content"]
    assert want and split["choices"][0]["message"]["content"] == want
    assert again["choices"][0]["message"]["content"] == want
