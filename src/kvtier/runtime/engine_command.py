"""The vLLM command ``kvtier serve`` runs, and what goes into it: the store's configuration
from kvtier's options (checked before vLLM starts), the connector's configuration, the engine's
dtype, its process layout and KV events (the arguments: :mod:`kvtier.cli.serve_cmd`; ``kvtier pod``
starts its engines through that command too)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from kvtier.config import (
    DiskTierConfig,
    MemoryTierConfig,
    RedisTierConfig,
    S3TierConfig,
    StoreConfig,
    TierConfig,
    config_from_dict,
    load_config,
    parse_size,
    read_secret,
)
from kvtier.errors import ConfigError
from kvtier.factory import check_quotas
from kvtier.integrations.engine_dtype import HANDED_DTYPE, DtypeChoice, choose_dtype, given_dtype
from kvtier.integrations.engine_layout import EngineLayout, choose_layout, has_gpu, option
from kvtier.integrations.engine_routes import FEED_PORT_ENV
from kvtier.integrations.front import FRONT_ENV, make_front
from kvtier.integrations.model import DEFAULT_MODEL_NAME, model_fingerprint
from kvtier.integrations.tenant_gate import TENANTS_ENV
from kvtier.policy.scheduling import SchedulingOptions
from kvtier.redis_process import free_port
from kvtier.runtime.codecs import apply_codecs
from kvtier.sealing import MasterKeys
from kvtier.tenants import load_tenants
from kvtier.tier_config import s3_location

SHUTDOWN_TIMEOUT_S = 30  # vLLM's --shutdown-timeout unless given: time to finish writes


def build_config(args: argparse.Namespace) -> StoreConfig:
    """The store configuration: file/env, then the command-line overrides."""
    config = load_config(args.config)
    tiers: list[TierConfig] = list(config.tiers)

    def replace(kind: type, **changes: Any) -> None:
        for i, tier in enumerate(tiers):
            if isinstance(tier, kind):
                tiers[i] = dataclasses.replace(tier, **changes)
                return
        tiers.append(kind(**changes))

    if args.dram:
        replace(MemoryTierConfig, capacity=parse_size(args.dram, "--dram"))
    if args.disk and args.disk.lower() == "none":
        tiers = [t for t in tiers if not isinstance(t, DiskTierConfig)]
    elif args.disk or args.disk_size:
        changes: dict[str, Any] = {}
        if args.disk:
            changes["path"] = args.disk
        if args.disk_size:
            changes["capacity"] = parse_size(args.disk_size, "--disk-size")
        replace(DiskTierConfig, **changes)
    user, secret = getattr(args, "redis_user", None), getattr(args, "redis_password_file", None)
    if (user or secret) and not args.redis:
        raise ConfigError("--redis-user and --redis-password-file go with --redis URL")
    if args.redis:
        redis_changes: dict[str, Any] = {"url": args.redis}
        if user:
            redis_changes["username"] = user
        if secret:
            read_secret(secret, "--redis-password-file")  # a bad file fails before vLLM starts
            redis_changes["password_file"] = str(Path(secret).resolve())
        try:
            replace(RedisTierConfig, **redis_changes)
        except ConfigError as exc:
            raise ConfigError(f"--redis: {str(exc).partition(': ')[2]}") from None
    s3 = getattr(args, "s3", None)
    if s3 and s3.lower() != "none":
        try:
            s3_changes: dict[str, Any] = s3_location(s3)
            if getattr(args, "s3_size", None):
                s3_changes["capacity"] = parse_size(args.s3_size, "--s3-size")
            replace(S3TierConfig, **s3_changes)
        except ConfigError as exc:
            raise ConfigError(f"--s3: {exc}") from None
    key_file = getattr(args, "master_key_file", None)
    if key_file:
        key_file = str(Path(key_file).expanduser().resolve())
        MasterKeys.load(key_file)  # a bad file fails before vLLM starts, naming no key
        config = dataclasses.replace(config, master_key_file=key_file, master_key_env="")
    elif config.master_key_file or config.master_key_env:
        MasterKeys.load(config.master_key_file, config.master_key_env)
    config = dataclasses.replace(config, tiers=tuple(tiers))
    # The gate is checked once the model is known (launch); without --codec, the tiers the
    # configuration leaves raw store what the model passed (kvtier.runtime.codecs).
    fingerprint = getattr(args, "model_fingerprint", None)
    specs = getattr(args, "codec", None) or []
    config, notes = apply_codecs(config, specs, fingerprint, getattr(args, "force_codec", False))
    for note in notes if fingerprint else []:
        print(f"kvtier serve: {note}", file=sys.stderr)
    tenants = getattr(args, "tenants", None)
    if tenants:  # the tenants' quotas in the tiers kvtier bounds (equal shares by default)
        config = dataclasses.replace(config, tenants_file=str(Path(tenants).resolve()))
    if config.tenants_file:
        check_quotas(config, load_tenants(config.tenants_file))  # before vLLM starts
    return config


def connector_config(config: StoreConfig) -> dict[str, Any]:
    """The kv_connector_extra_config that carries ``config`` (round-trips exactly)."""
    data = dataclasses.asdict(config)
    data["tiers"] = [dataclasses.asdict(t) for t in config.tiers]
    if config_from_dict(data, "kvtier") != config:  # a bug here would silently change tiers
        raise AssertionError("kvtier configuration does not round-trip")
    return data


def engine_dtype(args: argparse.Namespace, extra: list[str]) -> DtypeChoice:
    """The engine's dtype: the user's ``--dtype``, else the one handed over by ``kvtier pod``
    or a benchmark, else measured on this host."""
    given = option(extra, "--dtype")
    if given is not None:
        return given_dtype(given)
    handed = getattr(args, "engine_dtype_choice", None) or option(extra, HANDED_DTYPE)
    if handed:
        try:
            return DtypeChoice.from_dict(json.loads(handed))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{HANDED_DTYPE}: not a dtype choice ({exc})") from None
    return choose_dtype(has_gpu())


def dtype_options(choice: DtypeChoice) -> list[str]:
    """vLLM's options for ``choice``: none for the user's own --dtype (already among the
    options) or on an accelerator (the checkpoint's dtype, vLLM's default)."""
    return ["--dtype", choice.dtype] if choice.source == "measured" else []


def vllm_command(
    args: argparse.Namespace,
    model: str,
    extra: list[str],
    dtype: DtypeChoice | None = None,
    layout: EngineLayout | None = None,
) -> list[str]:
    extra_config = connector_config(build_config(args))
    if dtype is not None:
        extra_config["engine_dtype"] = dtype.as_dict()  # for /kvtier/info
    loads = getattr(args, "loads", "auto")
    if loads != "auto":
        extra_config["loads"] = loads
    if getattr(args, "write_through", False):
        extra_config["write_through"] = True
    feed_port = getattr(args, "feed_port", None)
    if feed_port:
        extra_config["feed_port"] = feed_port
    scheduling_args = scheduling_options(args, extra, extra_config)
    kv_events, events_args = kv_events_config(args, extra)
    if kv_events:
        extra_config["kv_events"] = kv_events
    transfer = {
        "kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra_config,
    }
    command = [
        sys.executable,
        "-m",
        "kvtier.integrations.vllm_main",
        "--model",
        model,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--kv-transfer-config",
        json.dumps(transfer),
    ]
    command += events_args + scheduling_args
    if feed_port:  # the feed on the server's own port, under /kvtier/
        command += ["--middleware", "kvtier.integrations.engine_routes.forward"]
    if getattr(args, "tenants", None):  # the file's path goes in the environment (launch)
        command += ["--middleware", "kvtier.integrations.tenant_gate.TenantGate"]
    if "--enforce-eager" not in extra and not has_gpu():
        command.append("--enforce-eager")  # no graph capture on CPU: faster start
    if not any("prompt-tokens-details" in a for a in extra):
        # Each answer's usage says how many prompt tokens were cached (vLLM's prefix cache
        # and kvtier's loads): the router compares them with what it predicted.
        command.append("--enable-prompt-tokens-details")
    if not any(a.split("=")[0] == "--shutdown-timeout" for a in extra):
        # vLLM's default (0) kills the engine processes at once on SIGTERM, and with them
        # the chunks still queued for disk or Redis: a restart would miss the last prompts.
        # Draining lets the worker exit normally, and kvtier flush its writes.
        command += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    if dtype is not None:
        command += dtype_options(dtype)
    if layout is not None:
        command += layout.options()
    return command + extra


HITS_FIRST_CLASS = "kvtier.integrations.vllm.hits_first.scheduler"


def scheduling_options(
    args: argparse.Namespace, extra: list[str], extra_config: dict[str, Any]
) -> list[str]:
    """vLLM's options for ``--scheduling`` (hits-first: kvtier's scheduler class, vLLM's
    priority policy), and the scheduler's own in ``extra_config``."""
    if getattr(args, "scheduling", "hits-first") != "hits-first":
        return []
    for name in ("--scheduler-cls", "--scheduling-policy"):
        if option(extra, name) is not None:
            raise ConfigError(
                f"{name}: --scheduling hits-first (the default) sets it; add --scheduling vllm"
                " to use vLLM's scheduling with your own options"
            )
    scheduling: dict[str, Any] = {"hits_first": True}  # also tells routers (/kvtier/info)
    for name in ("step_s", "max_step_s"):
        if getattr(args, name, None) is not None:
            scheduling[name] = getattr(args, name)
    try:
        SchedulingOptions(**scheduling)
    except ValueError as exc:
        raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
    extra_config["scheduling"] = scheduling
    return ["--scheduler-cls", HITS_FIRST_CLASS, "--scheduling-policy", "priority"]


def kv_events_config(
    args: argparse.Namespace, extra: list[str]
) -> tuple[dict[str, Any] | None, list[str]]:
    """Where vLLM publishes its KV events, for the router (``{"port", "topic"}``, or None),
    and the vLLM options that make it so (none when the user gave ``--kv-events-config``)."""
    given = option(extra, "--kv-events-config")
    if given is not None:
        try:
            config = json.loads(given)
        except ValueError as exc:
            raise ConfigError(f"--kv-events-config: not JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ConfigError("--kv-events-config: expected a JSON object")
        if not config.get("enable_kv_cache_events") or config.get("publisher") != "zmq":
            return None, []
        endpoint = str(config.get("endpoint", "tcp://*:5557"))
        given_port = endpoint.rpartition(":")[2]
        if not endpoint.startswith("tcp://") or not given_port.isdigit():
            return None, []  # ipc:// or inproc://: not reachable by a router
        return {"port": int(given_port), "topic": str(config.get("topic", ""))}, []
    port = getattr(args, "kv_events_port", None) or free_port()
    if not 0 < port < 65536:
        raise ConfigError(f"--kv-events-port: {port} is not a port number")
    # vLLM binds only a wildcard endpoint (it connects to any other): all interfaces.
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port}",
        "topic": "kvtier",
    }
    return {"port": port, "topic": "kvtier"}, ["--kv-events-config", json.dumps(config)]


def launch(args: argparse.Namespace, extra: list[str]) -> int:
    """``kvtier serve`` with its checked options: the engine's dtype and layout chosen and
    printed, then vLLM's server takes over this process (``--dry-run``: print its command)."""
    dtype = engine_dtype(args, extra)
    print(f"kvtier serve: {dtype.line()}", file=sys.stderr)
    if args.model:
        model = args.model
    else:
        from kvtier.integrations.model import prepare_default_model

        model = str(prepare_default_model(dtype=dtype.dtype))
        if not any(a.split("=")[0] == "--served-model-name" for a in extra):
            # vLLM would name the model by its directory; the README calls it by this name.
            extra = ["--served-model-name", DEFAULT_MODEL_NAME, *extra]
    args.model_fingerprint = model_fingerprint(model) or None  # the codecs' quality gate
    if args.feed_port is None:
        args.feed_port = free_port()
    # vLLM keeps two cores from the worker with a KV connector (one without).
    layout = choose_layout(extra, os.environ, reserved_by_default=2, gpu=has_gpu())
    print(f"kvtier serve: {layout.line()}", file=sys.stderr)
    command = vllm_command(args, model, extra, dtype, layout)
    env = dict(os.environ)
    for name, value in layout.env().items():
        env.setdefault(name, value)
    env[FEED_PORT_ENV] = str(args.feed_port)  # for the middleware in vLLM's API process
    if getattr(args, "tenants", None):
        env[TENANTS_ENV] = str(Path(args.tenants).resolve())
    if not has_gpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of RAM for vLLM's own KV cache
    print("kvtier serve: " + " ".join(command[:8]) + " ...", file=sys.stderr)
    if args.dry_run:
        print(json.dumps(command))
        return 0
    # Requests on their way from the API server to the scheduler (kvtier.integrations.front):
    # a memory file this process keeps open as it becomes vLLM's API server.
    try:
        _, env[FRONT_ENV] = make_front()
    except (AttributeError, OSError):  # no memfd here: the engine gathers by time alone
        env.pop(FRONT_ENV, None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)  # vLLM takes over this process (and its signals)
