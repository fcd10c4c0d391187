"""How many processes the engine runs in on CPU: vLLM's worker in its own process, or inside
the engine-core process, where the scheduler runs.

vLLM on CPU runs three processes: the API server, the engine core (the scheduler) and one
worker (the model), each a fresh interpreter that imports torch and vLLM (spawned: forking a
process that holds OpenMP threads is not safe; see :mod:`kvtier.integrations.engine_fork`).
The worker's compute threads are bound to cores of one NUMA node, and by default vLLM keeps
some of that node's physical cores out of it for the other processes: one for the engine core,
one more with a KV connector. When the node has no more cores than that, vLLM keeps none and
the worker computes on every core anyway; and since the CPU engine schedules synchronously (the
scheduler waits for each step), a process of its own buys the worker nothing there. It costs a
third start (measured on 2-core AMD EPYC: the server answered 39-43 s after start with the
worker inside the engine core, 53-57 s with a worker process) and a third copy of torch and
vLLM in memory (~650 MB).

So :func:`choose_layout` puts the worker inside the engine-core process (vLLM's ``uni``
executor) exactly when vLLM would give the worker every core the engine may use: one NUMA
node and no core kept back, or an explicit one-rank core list
(``VLLM_CPU_OMP_THREADS_BIND=0,1``, what ``kvtier pod`` gives each engine). The compute
threads then run on the cores vLLM would have bound them to (``OMP_NUM_THREADS`` and the CPU
affinity of the engine core, forked from the API server by
:mod:`kvtier.integrations.engine_fork`), and wait for each other asleep, not spinning
(``OMP_WAIT_POLICY=PASSIVE``: they share those cores with the scheduler). Anything
else (several NUMA nodes, cores kept for the scheduler, tensor or pipeline parallelism, a
GPU, ``--distributed-executor-backend`` given) keeps vLLM's own layout.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# The cores the engine's processes may run on, handed to kvtier.integrations.vllm_main.
CORES_ENV = "KVTIER_ENGINE_CORES"
SYS_CPU = Path("/sys/devices/system/cpu")
SYS_NODE = Path("/sys/devices/system/node")
# Options that make more than one worker rank: vLLM's layout is then left alone.
PARALLEL_OPTIONS = (
    "--tensor-parallel-size",
    "-tp",
    "--pipeline-parallel-size",
    "-pp",
    "--data-parallel-size",
    "-dp",
)


@dataclass(frozen=True)
class EngineLayout:
    """Where the engine's worker runs: ``one_process`` (inside the engine core) on ``cores``,
    or vLLM's own layout (``cores`` None)."""

    one_process: bool
    cores: tuple[int, ...] | None
    reason: str

    def options(self) -> list[str]:
        """The vLLM options that make this layout."""
        return ["--distributed-executor-backend", "uni"] if self.one_process else []

    def env(self) -> dict[str, str]:
        """The environment the engine's processes need for this layout."""
        if not self.one_process or self.cores is None:
            return {}
        return {
            # vLLM on CPU replaces the uni executor with its multiprocess one unless told
            # that the engine core itself may hold the model.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "OMP_NUM_THREADS": str(len(self.cores)),
            # The compute threads share their cores with the scheduler (same process) and the
            # API server: an OpenMP thread that spins at a barrier takes the core from the
            # thread it waits for. Under another engine's load on the same 2 cores, spinning
            # (the default) took a 700-token prompt's 60-token tail 2.3-4.8 s, sleeping 0.7-0.8
            # s, and the cold prompt 10.2-11.9 s against 5.9-7.8. Idle, both were within the
            # host's noise (cold 3.1-4.5 s either way; 8.5-10.8 decoded tokens/s).
            "OMP_WAIT_POLICY": "PASSIVE",
            CORES_ENV: ",".join(str(c) for c in self.cores),
        }

    def line(self) -> str:
        if self.one_process:
            return (
                f"engine in two processes (API server; engine core with the worker inside), "
                f"computing on cores {list(self.cores or ())}: {self.reason}"
            )
        return f"engine in vLLM's own layout (a worker process): {self.reason}"


@dataclass(frozen=True)
class Cpu:
    """One logical CPU the engine may use."""

    id: int
    core: tuple[int, int]  # (package, core id): the physical core
    node: int  # NUMA node


def has_gpu() -> bool:
    """Whether this host has an NVIDIA GPU (vLLM then computes there, not on CPU cores)."""
    return shutil.which("nvidia-smi") is not None


def allowed_cpus(sys_cpu: Path = SYS_CPU, sys_node: Path = SYS_NODE) -> list[Cpu]:
    """The logical CPUs this process may run on, with their physical core and NUMA node
    (where /sys does not say, each CPU is its own core on node 0)."""
    nodes: dict[int, int] = {}
    for node_dir in sorted(sys_node.glob("node[0-9]*")):
        try:
            ids = parse_cpu_list((node_dir / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        for cpu in ids:
            nodes[cpu] = int(node_dir.name[4:])
    cpus = []
    for cpu in sorted(os.sched_getaffinity(0)):
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            core = (
                int((topology / "physical_package_id").read_text()),
                int((topology / "core_id").read_text()),
            )
        except (OSError, ValueError):
            core = (0, cpu)
        cpus.append(Cpu(cpu, core, nodes.get(cpu, 0)))
    return cpus


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8"`` -> [0, 1, 2, 3, 8] (the kernel's and vLLM's CPU list format)."""
    ids: list[int] = []
    for part in text.strip().split(","):
        if not part.strip():
            continue
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def option(extra: Sequence[str], name: str) -> str | None:
    """The value of vLLM option ``name`` among ``extra`` (``--name V`` or ``--name=V``)."""
    for i, arg in enumerate(extra):
        if arg == name and i + 1 < len(extra):
            return extra[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def choose_layout(
    extra: Sequence[str],
    env: Mapping[str, str],
    reserved_by_default: int,
    gpu: bool,
    cpus: list[Cpu] | None = None,
) -> EngineLayout:
    """The layout for an engine started with vLLM options ``extra`` and environment ``env``;
    ``reserved_by_default``: the physical cores vLLM keeps out of the worker unless
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` says (2 with a KV connector, 1 without)."""
    if gpu:
        return EngineLayout(False, None, "a GPU host")
    if option(extra, "--distributed-executor-backend") is not None:
        return EngineLayout(False, None, "--distributed-executor-backend given")
    for name in PARALLEL_OPTIONS:
        size = option(extra, name)
        if size is not None and size.strip() != "1":
            return EngineLayout(False, None, f"{name} {size}")
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "auto").strip()
    if bind == "nobind":
        return EngineLayout(False, None, "VLLM_CPU_OMP_THREADS_BIND=nobind")
    if bind != "auto":
        if "|" in bind:
            return EngineLayout(False, None, "one core list per rank in VLLM_CPU_OMP_THREADS_BIND")
        try:
            cores = tuple(parse_cpu_list(bind))
        except ValueError:
            return EngineLayout(False, None, f"VLLM_CPU_OMP_THREADS_BIND={bind!r} (vLLM reads it)")
        if not cores:
            return EngineLayout(False, None, "VLLM_CPU_OMP_THREADS_BIND is empty")
        return EngineLayout(True, cores, "the worker's cores are given (VLLM_CPU_OMP_THREADS_BIND)")
    cpus = allowed_cpus() if cpus is None else cpus
    nodes = sorted({cpu.node for cpu in cpus})
    if len(nodes) != 1:
        return EngineLayout(False, None, f"{len(nodes)} NUMA nodes: vLLM binds the worker to one")
    # vLLM's auto binding: one logical CPU per physical core (the highest-numbered one).
    per_core: dict[tuple[int, int], int] = {}
    for cpu in cpus:
        per_core[cpu.core] = max(per_core.get(cpu.core, cpu.id), cpu.id)
    cores = tuple(sorted(per_core.values()))
    reserved_text = env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "").strip()
    reserved = int(reserved_text) if reserved_text.isdigit() else reserved_by_default
    if reserved and len(cores) > reserved:
        return EngineLayout(
            False, None, f"vLLM keeps {reserved} of {len(cores)} cores for its other processes"
        )
    why = (
        "no core kept for the scheduler"
        if not reserved
        else f"{len(cores)} cores, no more than vLLM would keep back, so it keeps none"
    )
    return EngineLayout(True, cores, f"the worker would compute on every core anyway ({why})")
