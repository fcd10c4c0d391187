"""The engine's process layout on CPU: the worker inside the engine core exactly where vLLM's
own layout would give it every core anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvtier.integrations.engine_fork import ForkContext
from kvtier.integrations.engine_layout import (
    CORES_ENV,
    Cpu,
    allowed_cpus,
    choose_layout,
    parse_cpu_list,
)
from kvtier.runtime.engine_process import plain_vllm_env


def host(cores: int, threads: int = 1, nodes: int = 1) -> list[Cpu]:
    """A host of ``cores`` physical cores, ``threads`` logical CPUs each (Linux numbering:
    sibling threads are ``cores`` apart), split evenly over ``nodes`` NUMA nodes."""
    per_node = cores // nodes
    return [Cpu(t * cores + c, (0, c), c // per_node) for t in range(threads) for c in range(cores)]


def test_a_host_where_vllm_keeps_no_core_back_runs_the_worker_in_the_engine_core() -> None:
    layout = choose_layout([], {}, 2, gpu=False, cpus=host(2))
    assert layout.one_process and layout.cores == (0, 1), layout
    assert layout.options() == ["--distributed-executor-backend", "uni"]
    assert layout.env() == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "2",
        "OMP_WAIT_POLICY": "PASSIVE",
        CORES_ENV: "0,1",
    }
    # One logical CPU per physical core, the higher-numbered sibling, as vLLM binds.
    smt = choose_layout([], {}, 2, gpu=False, cpus=host(2, threads=2))
    assert smt.one_process and smt.cores == (2, 3), smt
    # No core kept back at all: any core count on one node.
    none_kept = choose_layout([], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, 2, False, host(16))
    assert none_kept.one_process and none_kept.cores == tuple(range(16))


def test_vllms_own_layout_stays_wherever_it_differs() -> None:
    kept = choose_layout([], {}, 2, gpu=False, cpus=host(8))
    assert not kept.one_process and "keeps 2 of 8 cores" in kept.reason
    assert kept.options() == [] and kept.env() == {}
    numa = choose_layout([], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, 2, False, host(4, nodes=2))
    assert not numa.one_process and "2 NUMA nodes" in numa.reason
    assert not choose_layout([], {}, 2, gpu=True, cpus=host(2)).one_process
    for options in (
        ["--distributed-executor-backend", "mp"],
        ["-tp", "2"],
        ["--pipeline-parallel-size=2"],
    ):
        assert not choose_layout(options, {}, 2, False, host(2)).one_process, options
    assert choose_layout(["--tensor-parallel-size", "1"], {}, 2, False, host(2)).one_process
    for bind in ("nobind", "0-1|2-3", "", "x"):
        env = {"VLLM_CPU_OMP_THREADS_BIND": bind}
        assert not choose_layout([], env, 2, False, host(8)).one_process, bind


def test_a_given_core_list_is_where_the_worker_computes() -> None:
    """`kvtier pod` gives each engine its cores: one process, on exactly those."""
    layout = choose_layout([], {"VLLM_CPU_OMP_THREADS_BIND": "4-5,7"}, 2, False, host(8))
    assert layout.one_process and layout.cores == (4, 5, 7)
    assert layout.env()[CORES_ENV] == "4,5,7" and layout.env()["OMP_NUM_THREADS"] == "3"
    assert parse_cpu_list("0-2,8\n") == [0, 1, 2, 8]


def test_the_cpus_are_read_from_sys(tmp_path: Path) -> None:
    mine = sorted(os.sched_getaffinity(0))
    for cpu in mine:  # two logical CPUs per physical core, on node 0
        topology = tmp_path / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{cpu // 2}\n")
    (tmp_path / "node" / "node0").mkdir(parents=True)
    (tmp_path / "node" / "node0" / "cpulist").write_text(",".join(map(str, mine)) + "\n")
    cpus = allowed_cpus(tmp_path / "cpu", tmp_path / "node")
    assert [c.id for c in cpus] == mine
    assert all(c.node == 0 and c.core == (0, c.id // 2) for c in cpus)
    # Without /sys, each CPU is its own core on node 0.
    bare = allowed_cpus(tmp_path / "none", tmp_path / "none")
    assert [c.core for c in bare] == [(0, c) for c in mine]


def test_kvtier_serve_and_the_plain_baseline_say_and_pass_the_layout() -> None:
    def dry_run(*args: str, **env: str) -> tuple[list[str], str]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "kvtier.cli.main",
                "serve",
                "--dry-run",
                "--disk",
                "none",
                "--dtype",
                "float32",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env},
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout), out.stderr

    command, err = dry_run(VLLM_CPU_OMP_THREADS_BIND="0")
    assert command[command.index("--distributed-executor-backend") + 1] == "uni"
    assert "kvtier serve: engine in two processes" in err and "on cores [0]" in err
    command, err = dry_run("--distributed-executor-backend", "mp")
    assert command.count("--distributed-executor-backend") == 1, command
    assert "engine in vLLM's own layout (a worker process): --distributed-executor-backend" in err
    # The plain vLLM baseline runs in kvtier serve's layout on the same cores.
    plain = plain_vllm_env()
    assert plain["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    layout = choose_layout([], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, 1, gpu=False)
    assert plain.get(CORES_ENV) == layout.env().get(CORES_ENV)


def report_affinity(out: Any) -> None:
    out.send(sorted(os.sched_getaffinity(0)))


def test_the_forked_engine_core_binds_itself_and_leaves_its_parent_free() -> None:
    """The context engine_fork hands vLLM forks (no fresh interpreter: the same main module
    and modules already imported) a process bound to the engine's cores; the parent (the API
    server) keeps all of its own."""
    mine = os.sched_getaffinity(0)
    core = min(mine)
    context = ForkContext({core})
    assert context.get_start_method() == "fork"
    ours, theirs = context.Pipe()
    child = context.Process(target=report_affinity, args=(theirs,), name="EngineCore")
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and ours.poll(5)
    assert ours.recv() == [core]
    assert os.sched_getaffinity(0) == mine
