"""The command line, run as a user runs it: the installed `kvtier` script in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier import TieredStore
from kvtier.redis_process import RedisServer
from kvtier.runtime.engine_command import HITS_FIRST_CLASS
from kvtier.seaweed_process import SeaweedFS
from kvtier.tiers import DiskTier, RedisTier, S3Tier

from kvhelpers import CHUNK_TOKENS, NS, chunks_for, prompt
from paths import README

KVTIER = shutil.which("kvtier", path=str(Path(sys.executable).parent)) or "kvtier"


GIVEN_DTYPE = ("--dtype", "float32")


def kvtier(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KVTIER, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
        env={**os.environ, **(env or {})},
    )


def test_help_teaches() -> None:
    out = kvtier("--help").stdout
    for word in ("bench", "inspect", "config", "serve", "examples"):
        assert word in out
    assert "--chunk-mb" in kvtier("bench", "store", "--help").stdout


@pytest.mark.parametrize("tier", ["memory", "disk", "redis"])
def test_bench_store_prints_its_figures(tier: str, tmp_path: Path) -> None:
    extra = ["--dir", str(tmp_path)] if tier == "disk" else []
    result = kvtier(
        "bench", "store", "--tier", tier, "--total-mb", "24", "--repeat", "1", "--json", *extra
    )
    figures = json.loads(result.stdout)
    # 256 tokens of SmolLM2-135M in the KV dtype of this host's engine: 5,898,240 bytes in
    # bf16, twice that in fp32 (a CPU without native bf16)
    itemsize = {"bfloat16": 2, "float32": 4}[figures["kv_dtype"]]
    assert figures["chunk_bytes"] == 256 * 30 * 2 * 3 * 64 * itemsize
    assert figures["tier"] == tier and figures["chunks"] == round(24e6 / figures["chunk_bytes"])
    assert f"engine dtype {figures['kv_dtype']}" in figures["host"]
    for key in ("put_gbps", "get_gbps", "raw_put_gbps", "raw_get_gbps", "get_ratio"):
        assert figures[key] > 0
    assert figures["get_ratio"] == pytest.approx(figures["get_gbps"] / figures["raw_get_gbps"])
    if tier == "disk":
        assert list(tmp_path.iterdir()) == []  # cleaned up after itself
    table = kvtier(
        "bench",
        "store",
        "--tier",
        tier,
        "--total-mb",
        "12",
        "--repeat",
        "1",
        "--dtype",
        "bfloat16",
        *extra,
    ).stdout
    assert "raw medium" in table and "ratio" in table
    assert "2 chunks of 5.9 MB (0.01 GB) of bfloat16 KV" in table
    assert "measured on: CPU " in table


def _disk_with_chunks(root: Path) -> list[Path]:
    with TieredStore([DiskTier(root, 1 << 30)], CHUNK_TOKENS) as store:
        store.put(prompt(1, 3), NS, chunks_for(1, 3))
        return [
            store.tiers[0].path_of(k)  # type: ignore[attr-defined]
            for k in store.keys(prompt(1, 3), NS)
        ]


def test_inspect_disk_reports_and_verifies_without_modifying(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    paths = _disk_with_chunks(root)
    report = json.loads(kvtier("inspect", "--disk", str(root), "--json").stdout)
    assert report["chunks"] == 3 and report["namespaces"] == {NS.id(CHUNK_TOKENS): 3}
    assert report["bytes"] == sum(p.stat().st_size for p in paths)
    assert report["oldest"] <= report["newest"]
    # Damage one payload: only --verify sees it; nothing is changed without --repair.
    raw = bytearray(paths[2].read_bytes())
    raw[-1] ^= 0xFF
    paths[2].write_bytes(bytes(raw))
    shutil.rmtree(root / ".tmp")
    before = {p: p.stat().st_mtime_ns for p in paths}
    assert kvtier("inspect", "--disk", str(root)).returncode == 0
    bad = kvtier("inspect", "--disk", str(root), "--verify", "--json", check=False)
    assert bad.returncode == 1
    listed = json.loads(bad.stdout)["bad"]
    assert [b["key"] for b in listed] == [paths[2].stem] and "checksum" in listed[0]["problem"]
    assert {p: p.stat().st_mtime_ns for p in paths} == before
    assert not (root / ".tmp").exists()
    text = kvtier("inspect", "--disk", str(root), "--verify", check=False).stdout
    assert paths[2].stem in text and "1 bad" in text
    fixed = kvtier("inspect", "--disk", str(root), "--verify", "--repair")
    assert fixed.returncode == 0 and not paths[2].exists() and paths[0].exists()
    assert kvtier("inspect", "--disk", str(root), "--verify").returncode == 0


def test_inspect_redis(redis_server: RedisServer) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    prefix = "inspectcli"
    tier = RedisTier(redis_server.url, prefix=prefix)
    with TieredStore([tier], CHUNK_TOKENS) as store:
        store.put(prompt(2, 2), NS, chunks_for(2, 2))
        name = tier.redis_key(store.keys(prompt(2, 2), NS)[1])
    args = ["inspect", "--redis", redis_server.url, "--prefix", prefix]
    assert json.loads(kvtier(*args, "--json").stdout)["chunks"] == 2
    client.setrange(name, 120, b"\xff\xfe")
    assert kvtier(*args, "--verify", check=False).returncode == 1
    assert client.exists(name) == 1  # inspection alone changes nothing
    assert kvtier(*args, "--verify", "--repair").returncode == 0
    assert client.exists(name) == 0
    client.close()


def test_inspect_s3(seaweed: SeaweedFS, prefix: str) -> None:
    tier = S3Tier(seaweed.client(), 1 << 30, prefix=prefix)
    with TieredStore([tier], CHUNK_TOKENS) as store:
        store.put(prompt(3, 3), NS, chunks_for(3, 3))
        name = tier.object_name(store.keys(prompt(3, 3), NS)[1])
    url = f"{seaweed.url}/{prefix}"
    env = seaweed.env()  # its keys in a file the environment names; none on the line
    report = json.loads(kvtier("inspect", "--s3", url, "--json", env=env).stdout)
    assert report["chunks"] == 3 and report["tier"] == "s3"
    client = seaweed.client()
    value = bytearray(client.get(name) or b"")
    value[-5] ^= 0xFF
    client.put(name, value)
    assert kvtier("inspect", "--s3", url, "--verify", check=False, env=env).returncode == 1
    assert client.head(name) is not None  # inspection alone changes nothing
    assert kvtier("inspect", "--s3", url, "--verify", "--repair", env=env).returncode == 0
    assert client.head(name) is None
    refused = kvtier("inspect", "--s3", "http://key:secret@127.0.0.1:1/b3", check=False)
    assert refused.returncode == 2 and "no credentials in a URL" in refused.stderr
    assert "secret" not in refused.stderr


def test_the_readmes_object_storage_lines(seaweed: SeaweedFS, tmp_path: Path) -> None:
    """The README's G4 block, as written with the store's port: each `kvtier serve` line
    builds its S3 tier (--dry-run: the servers are tests/e2e's), `kvtier inspect` runs."""
    block = README.read_text().split("## Object storage", 1)[1].split("```sh\n", 1)[1]
    lines = [ln.split("#", 1)[0] for ln in block.split("```", 1)[0].splitlines()]
    port = str(seaweed.ports["s3"])
    tiers = []
    for line in (ln.replace("8333", port) for ln in lines if ln.startswith("kvtier serve")):
        out = kvtier(*line.split()[1:], "--dry-run", env={"AWS_REGION": "eu-west-1"}).stdout
        command = json.loads(out.strip().splitlines()[-1])  # --dry-run: the vLLM command
        config = json.loads(command[command.index("--kv-transfer-config") + 1])
        tiers.append(
            next(t for t in config["kv_connector_extra_config"]["tiers"] if t["kind"] == "s3")
        )
    assert [(t["endpoint"], t["bucket"], t["prefix"]) for t in tiers] == [
        (f"http://127.0.0.1:{port}", "kvtier", "kvtier"),
        ("", "my-bucket", "kvtier"),
    ]
    assert tiers[0]["capacity"] == 1 << 40
    inspect = next(ln for ln in lines if ln.startswith("kvtier inspect --s3"))
    words = inspect.replace("8333", port).split()[1:]
    report = kvtier(*words, env=seaweed.env())
    assert "s3 tier at" in report.stdout and "0 bad" in report.stdout


def test_inspect_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = kvtier("inspect", "--disk", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2 and "no such directory" in result.stderr
    assert not (tmp_path / "nope").exists()


def test_config_command_shows_the_effective_configuration(tmp_path: Path) -> None:
    env = {**os.environ, "KVTIER_DISK_PATH": str(tmp_path), "KVTIER_MEMORY_CAPACITY": "1GiB"}
    out = subprocess.run(
        [KVTIER, "config"], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert f"path: {tmp_path}" in out and f"capacity: {2**30}" in out
    env["KVTIER_DISK_CAPACITY"] = "huge"
    bad = subprocess.run([KVTIER, "config"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "KVTIER_DISK_CAPACITY" in bad.stderr


def test_serve_checks_kvtier_options_before_starting_vllm(tmp_path: Path) -> None:
    bad = kvtier("serve", "--dram", "lots", check=False)
    assert bad.returncode == 2 and "--dram: expected a size" in bad.stderr
    bad = kvtier("serve", "--redis", "http://nope", check=False)
    assert bad.returncode == 2 and "--redis: expected redis://" in bad.stderr
    # With a dtype given nothing is measured (seconds each time): the measured choice is
    # tested in test_engine_dtype.py and test_readme_serve.py.
    dry = kvtier(
        "serve",
        "--dry-run",
        *GIVEN_DTYPE,
        "--disk",
        str(tmp_path),
        "--redis",
        "redis://127.0.0.1:6379/0",
        "--port",
        "8123",
        "--max-model-len",
        "2048",
    )
    command = json.loads(dry.stdout)
    assert command[1:3] == ["-m", "kvtier.integrations.vllm_main"]  # vLLM's server, light main
    assert command[-2:] == ["--max-model-len", "2048"]  # vLLM's own options pass through
    transfer = json.loads(command[command.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector"] == "KvtierConnector"
    assert transfer["kv_load_failure_policy"] == "recompute"
    tiers = transfer["kv_connector_extra_config"]["tiers"]
    assert [t["kind"] for t in tiers] == ["memory", "disk", "redis"]
    assert tiers[1]["path"] == str(tmp_path)
    # The embedded model is served under the name the README uses; a user's own name wins.
    named = command.index("--served-model-name")
    assert command[named + 1] == "SmolLM2-135M-Instruct"
    # vLLM drains on SIGTERM (so kvtier's queued writes land) unless told otherwise.
    assert command[command.index("--shutdown-timeout") + 1] == "30"
    own = json.loads(kvtier("serve", "--dry-run", *GIVEN_DTYPE, "--served-model-name=mine").stdout)
    assert "--served-model-name=mine" in own and "--served-model-name" not in own
    # vLLM publishes its KV events where the feed tells the router; a user's own config wins.
    events = json.loads(command[command.index("--kv-events-config") + 1])
    told = transfer["kv_connector_extra_config"]["kv_events"]
    assert events["endpoint"] == f"tcp://*:{told['port']}" and events["enable_kv_cache_events"]
    mine = '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:7777"}'
    own = json.loads(kvtier("serve", "--dry-run", *GIVEN_DTYPE, "--kv-events-config", mine).stdout)
    assert own.count("--kv-events-config") == 1
    transfer = json.loads(own[own.index("--kv-transfer-config") + 1])
    assert transfer["kv_connector_extra_config"]["kv_events"] == {"port": 7777, "topic": ""}
    bad = kvtier("serve", "--dry-run", *GIVEN_DTYPE, "--kv-events-config", "{nope", check=False)
    assert bad.returncode == 2 and "--kv-events-config: not JSON" in bad.stderr
    # Hits first by default: kvtier's scheduler class under vLLM's priority policy; the step
    # target rides in the connector's configuration; --scheduling vllm leaves vLLM's own.
    assert command[command.index("--scheduler-cls") + 1] == HITS_FIRST_CLASS
    assert command[command.index("--scheduling-policy") + 1] == "priority"
    assert transfer["kv_connector_extra_config"]["scheduling"] == {"hits_first": True}
    timed = json.loads(kvtier("serve", "--dry-run", *GIVEN_DTYPE, "--step-s", "0.8").stdout)
    extra = json.loads(timed[timed.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert extra["scheduling"] == {"hits_first": True, "step_s": 0.8}
    plain = json.loads(kvtier("serve", "--dry-run", *GIVEN_DTYPE, "--scheduling", "vllm").stdout)
    assert "--scheduler-cls" not in plain and "--scheduling-policy" not in plain
    assert "scheduling" not in plain[plain.index("--kv-transfer-config") + 1]
    for args in (("--scheduling-policy", "fcfs"), ("--step-s", "0"), ("--scheduling", "x")):
        bad = kvtier("serve", "--dry-run", *GIVEN_DTYPE, *args, check=False)
        assert bad.returncode == 2 and args[0] in bad.stderr, bad.stderr


def test_pod_commands_refuse_bad_combinations_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kvtier.cli.main import main

    cases = [
        (("pod", "--engines", "2", "--prefill", "1", "--decode", "1"), "not both"),
        (("pod", "--prefill", "1"), "needs both --prefill P and --decode D"),
        (("pod", "--prefill", "1", "--decode", "1", "--redis", "none"), "shared tier"),
        (("router", "--prefill", "http://127.0.0.1:1"), "needs at least one --decode"),
        (("router", "--worker", "127.0.0.1:8001"), "is not an http:// or https:// URL"),
        (("router",), "no engine"),
        (("bench", "pod", "--overhead-tokens", "9000"), "--overhead-tokens must be in"),
        (("bench", "dtype", "--tokens", "100"), "--tokens in (256, 8192)"),
    ]
    for args, message in cases:
        assert main(list(args)) == 2, args
        assert message in capsys.readouterr().err, args
    assert "--prefill" in kvtier("pod", "--help").stdout
    assert "disaggregated" in kvtier("router", "--help").stdout


def test_codecs_measured_planned_and_gated_from_the_command_line(tmp_path: Path) -> None:
    table = json.loads(kvtier("bench", "store", "--codec", "all", "--json").stdout)
    rows = {r["codec"]: r for r in table["codecs"]}
    assert set(rows) == {"bf16", "int8", "int8c", "fp8", "int4", "int4r", "k8v4"}
    assert rows["int8"]["vs_bf16"] <= 0.53 and rows["int4"]["vs_bf16"] <= 0.30
    assert rows["int4r"]["vs_bf16"] <= 0.30 and rows["k8v4"]["vs_bf16"] <= 0.40
    assert all(r["encode_gb_s"] > 0 and r["decode_gb_s"] > 0 for r in rows.values())
    assert table["memcpy_gb_s"] > 0
    # make test installs a C compiler: int8 encodes in kvtier's kernel, torch's figure beside it
    assert table["int8_native"] and rows["int8"]["encode_torch_gb_s"] > 0
    assert table["int4r_native"] and rows["int4r"]["encode_torch_gb_s"] > 0
    assert table["k8v4_native"] and rows["k8v4"]["encode_torch_gb_s"] > 0
    printed = kvtier("bench", "store", "--codec", "all").stdout  # the README's line
    assert "decode GB/s" in printed and "memcpy" in printed and "int4" in printed
    assert "int8 encodes in kvtier's C kernel" in printed
    assert "int4r encodes in kvtier's C kernel" in printed
    bad = kvtier("bench", "store", "--codec", "int3", check=False)
    assert bad.returncode != 0 and "unknown codec 'int3'" in bad.stderr
    plan = kvtier("plan", "llama-3.1-405b", "--codec", "int8").stdout
    assert "stored as int8: 262,080 bytes per token (0.51x" in plan
    # serve: a lossy codec the model has not passed is refused before vLLM starts, unless
    # forced (with the warning); the gate's records live where KVTIER_FIDELITY_DIR says.
    env = {**os.environ, "KVTIER_FIDELITY_DIR": str(tmp_path / "gate")}
    base = ["serve", "--dry-run", *GIVEN_DTYPE, "--disk", str(tmp_path / "d")]
    run = [KVTIER, *base, "--codec", "disk=int4"]
    refused = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "int4 has not passed the quality gate" in refused.stderr
    forced = subprocess.run(
        [*run, "--force-codec"], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    assert "WARNING: --codec disk=int4 forced" in forced.stderr
    command = json.loads(forced.stdout)
    tiers = json.loads(command[command.index("--kv-transfer-config") + 1])[
        "kv_connector_extra_config"
    ]["tiers"]
    assert [t["compression"] for t in tiers] == ["none", "int4"]
