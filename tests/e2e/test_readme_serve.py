"""The README's first examples, the curl command, the openai client snippet and the engine
dtype's line, run as written against a real `kvtier serve` with the dtype it picks on this host
(extracted from README.md, so the README cannot drift), and the engine's process layout; the
same server then serves a repeated prompt from the DRAM tier of its worker."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvtier.integrations.engine_layout import choose_layout, has_gpu
from kvtier.redis_process import free_port
from kvtier.runtime.engine_process import Server, kvtier_serve_command

pytest.importorskip("vllm", reason="vLLM is installed by `make install`")

from paths import README

URL = "127.0.0.1:8000"  # where the README's snippets send their requests


def snippet(language: str, marker: str) -> str:
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if marker in b)


def vllm_processes(pid: int) -> list[str]:
    """The names of vLLM's processes under ``pid`` (its API server), outermost first."""
    names = []
    for child in subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True
    ).stdout.split():
        name = Path(f"/proc/{child}/comm").read_text().strip()
        if name.startswith("VLLM::"):
            names += [name, *vllm_processes(int(child))]
    return names


def engine_cores(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [
        int(c)
        for c in children.stdout.split()
        if Path(f"/proc/{c}/comm").read_text().strip() == "VLLM::EngineCor"
    ]


def port_8000_free() -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", 8000)) != 0


def test_the_readme_curl_and_openai_examples_work_against_kvtier_serve(tmp_path: Path) -> None:
    curl = snippet("sh", "/v1/completions")
    client = snippet("python", "from openai import OpenAI")
    assert URL in curl and URL in client
    # Port 8000 as in the README; if something else holds it, the same text on another port.
    port = 8000 if port_8000_free() else free_port()
    curl, client = (s.replace(URL, f"127.0.0.1:{port}") for s in (curl, client))
    # No --dtype: the server picks the engine's dtype for this host, as `make serve` does.
    command = kvtier_serve_command(
        port,
        "--disk",
        "none",
        "--dram",
        "512MiB",
        "--max-model-len",
        "4096",
        "--no-enable-prefix-caching",
    )
    with Server(command, port, tmp_path / "serve.log") as server:
        # The choice, said at start and by the README's /kvtier/info line.
        info = snippet("sh", "/kvtier/info").replace(URL, f"127.0.0.1:{port}")
        out = subprocess.run(["bash", "-c", info], capture_output=True, text=True, timeout=60)
        dtype = out.stdout.strip()
        assert out.returncode == 0 and dtype in ("float32", "bfloat16"), (out.stdout, out.stderr)
        assert f"kvtier serve: engine dtype {dtype} (measured: bf16 matmul" in server.tail(1 << 20)
        # The process layout, as the README shows it where vLLM would keep no core back.
        assert server.pid is not None
        expected = choose_layout([], os.environ, 2, has_gpu())
        said = re.search(r"^kvtier serve: engine in .*$", server.tail(1 << 20), re.M)
        assert said and said.group(0) == f"kvtier serve: {expected.line()}", said
        if expected.one_process:
            assert said.group(0) == snippet("text", "kvtier serve: engine in").strip()
        layout = ["VLLM::EngineCor"] + ([] if expected.one_process else ["VLLM::Worker"])
        assert vllm_processes(server.pid) == layout  # (a process's name: 15 characters)
        if expected.one_process:  # the engine core forked from the API server, not spawned
            forked = re.findall(
                r"^kvtier: the engine core computes on cores \[[\d, ]+\] "
                r"\(pid (\d+), forked from the API server\)$",
                server.tail(1 << 20),
                re.M,
            )
            assert [int(pid) for pid in forked] == engine_cores(server.pid), forked
        # Before any request, kvtier's series are there at 0 and its capacity is known
        # (rate() sees the first increment; a console shows an idle engine's tiers).
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            fresh = r.read().decode()
        assert re.search(r"^kvtier:lookups_total\{[^}]*\} 0\.0$", fresh, re.M), fresh
        capacity = r'^kvtier:tier_capacity_bytes\{[^}]*tier="memory"[^}]*\} 5\.36870912e\+08$'
        assert re.search(capacity, fresh, re.M), fresh  # --dram 512MiB
        out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert "error" not in reply and reply.get("object") != "error", reply
        assert reply["model"] == "SmolLM2-135M-Instruct"
        assert reply["choices"][0]["text"].strip()
        py = subprocess.run(
            [sys.executable, "-c", client], capture_output=True, text=True, timeout=300
        )
        assert py.returncode == 0, py.stderr[-3000:]
        assert py.stdout.strip()
        # The connector's scheduler half (in the engine core) only knows the DRAM of its
        # worker half (in the engine core too, or in vLLM's worker process) through the
        # events the worker sends back.
        shared = " ".join(f"Line {i} of a document that every request shares." for i in range(70))
        first = server.complete(shared, max_tokens=4)
        second = server.complete(shared, max_tokens=4)
        metrics = snippet("sh", "/metrics").replace(URL, f"127.0.0.1:{port}")
        shown = ""
        for _ in range(30):  # the stats reach the API server with a later step, or a tick
            out = subprocess.run(["bash", "-c", metrics], capture_output=True, text=True)
            shown = out.stdout
            if re.search(
                r'kvtier:tier_loaded_tokens_total\{[^}]*tier="memory"[^}]*\} [1-9]', shown
            ):
                break
            time.sleep(0.5)
    assert "from memory" in server.tail(1 << 20), server.tail()
    if dtype == "float32":  # exact; in bf16 the KV of one long step and of a hit plus a short
        assert second.text == first.text  # step differ a little, and so may greedy tokens
    assert re.search(r'kvtier:tier_loaded_tokens_total\{[^}]*tier="memory"[^}]*\} [1-9]', shown), (
        shown
    )
    assert re.search(r"kvtier:lookups_total\{[^}]*\} [1-9]", shown), shown
