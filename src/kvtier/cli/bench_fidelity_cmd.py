"""``kvtier bench fidelity``: the arguments, the run and its table (the measures:
:mod:`kvtier.bench.fidelity`; the gate's record: :mod:`kvtier.gate`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvtier import gate, quant
from kvtier.bench import fidelity

# Six contexts by default: the gate's top-1 line sits one point below a floor measured on the
# same positions, and with two (480 positions) the floor itself moved from 99.6% to 98.4%
# between two runs on one host (bf16 SmolLM2-135M); six give 1,430 positions.
CONTEXTS = 6


def register(bsub: Any) -> None:
    p = bsub.add_parser(
        "fidelity",
        help="what each KV codec costs in quality on the served model (KL, top-1, answers)",
        description=fidelity.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        help="a Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--codecs",
        default="all",
        help="codecs, comma-separated (all: " + ", ".join(quant.LOSSY) + ")",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="the model's dtype (default: the engine dtype `kvtier serve` picks on this host)",
    )
    p.add_argument(
        "--contexts",
        type=int,
        default=CONTEXTS,
        help=f"contexts, 8 questions each ({CONTEXTS}: ~1,430 positions, enough for a one-point"
        " line; every codec takes ~3 minutes a context on a 2-core host)",
    )
    p.add_argument("--tokens", type=int, default=3000, help="tokens per context (~3000)")
    p.add_argument(
        "--gate",
        action="store_true",
        help="record the codecs that pass for this model (top-1 >= 99%% less the engine's own"
        " floor, mean KL <= 0.01 nats, accuracy within 1 point): kvtier serve then allows them"
        " and --codec auto picks one",
    )
    p.add_argument(
        "--served",
        action="store_true",
        help="also through kvtier serve: a cold server's greedy answers against a restarted"
        " server's whose Redis tier holds each codec (a real redis-server; ~2 minutes a codec"
        " for six contexts on a 2-core host); with --gate, a codec must pass both",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.integrations.engine_dtype import host_dtype
    from kvtier.integrations.engine_layout import has_gpu
    from kvtier.integrations.model import model_fingerprint, prepare_default_model

    codecs = list(quant.LOSSY) if args.codecs == "all" else args.codecs.split(",")
    unknown = [c for c in codecs if c not in quant.LOSSY]
    if unknown:
        raise SystemExit(
            f"kvtier bench fidelity: unknown codec {unknown[0]!r}; codecs: all, "
            + ", ".join(quant.LOSSY)
        )
    if args.contexts < 1 or args.tokens < 200:
        raise SystemExit("kvtier bench fidelity: --contexts >= 1 and --tokens >= 200")
    if args.served and args.model:
        raise SystemExit("kvtier bench fidelity: --served runs kvtier serve's embedded model only")
    choice = host_dtype(args.dtype, has_gpu())
    dtype = choice.kv_dtype
    path = args.model or str(prepare_default_model(dtype=dtype))
    print(f"kvtier bench fidelity: {path} in {dtype}", file=sys.stderr)
    model = fidelity.Model(path, dtype)
    result = fidelity.measure(
        model, codecs, args.contexts, args.tokens, lambda s: print(f"  {s}", file=sys.stderr)
    )
    result |= {"model": path, "dtype": dtype}
    if args.served:
        result["served"] = _served(codecs, args, choice, result["codecs"])
    if args.gate:
        fingerprint = model_fingerprint(path)
        if not fingerprint:
            raise SystemExit(f"kvtier bench fidelity: {path} has no config.json to fingerprint")
        result["gate_file"] = str(gate.record(fingerprint, path, dtype, result))
    if args.json:
        print(json.dumps(result))
        return 0
    reference = result["reference_accuracy"]
    print(
        f"{path} ({dtype}): {len(result['context_tokens'])} contexts of"
        f" {result['context_tokens']} tokens, {result['questions']} questions; reference"
        f" (uncompressed KV) accuracy {result['reference_accuracy']:.1%}"
    )
    print(
        f"{'codec':<10} {'KL mean':>9} {'KL p99':>9} {'top-1':>7} {'greedy 32':>10}"
        f" {'accuracy':>9} {'gate':>5}"
    )
    floor = result["floor"]
    for r in [*result["codecs"], floor]:
        ok = "floor" if r is floor else "pass" if gate.passes(r, reference, floor) else "FAIL"
        print(
            f"{r['codec']:<10} {r['kl_mean']:>9.5f} {r['kl_p99']:>9.5f}"
            f" {r['top1_agreement']:>7.1%} {r['greedy_agreement']:>10.1%}"
            f" {r['accuracy']:>9.1%} {ok:>5}"
        )
    print(
        f"floor ({fidelity.FLOOR}): the reference KV computed again in {fidelity.CHUNK}-token"
        f" pieces, the same KV but for {dtype}'s rounding"
    )
    print(
        f"gate: top-1 >= {gate.top1_min(floor):.1%} ({gate.TOP1_MIN:.0%} less the floor's"
        f" {1 - floor['top1_agreement']:.1%}), mean KL <= {gate.KL_MEAN_MAX} nats, accuracy"
        f" within {gate.ACCURACY_DROP_MAX:.0%} of the reference; positions per codec:"
        f" {floor['positions']}"
    )
    if args.served:
        _print_served(result["served"])
    if args.gate:
        print(f"recorded: {result['gate_file']}")
    return 0


def _served(
    codecs: list[str], args: argparse.Namespace, choice: Any, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from kvtier.bench import served

    with tempfile.TemporaryDirectory(prefix="kvtier-served-") as work:
        result = served.measure(
            codecs,
            args.contexts,
            args.tokens,
            choice,
            Path(work),
            lambda s: print(f"  served: {s}", file=sys.stderr),
        )
    served.judge(result, rows)
    return result


def _print_served(result: dict[str, Any]) -> None:
    from kvtier.bench.served import MARGIN

    n = result["questions"]
    print(
        f"through kvtier serve: {n} questions; restarted servers whose Redis tier holds the"
        " codec (recoded from a cold server's raw chunks) against the one reading the raw"
        f" chunks, and against the cold server (accuracy {result['cold_accuracy']:.1%})"
    )
    print(
        f"{'codec':<10} {'identical':>9} {'greedy 32':>10} {'model':>7} {'vs cold':>8}"
        f" {'greedy':>7} {'accuracy':>9} {'hit':>6} {'served':>6}"
    )
    for r in result["rows"]:
        model = r.get("model_greedy_agreement")
        verdict = {True: "pass", False: "FAIL", None: "-"}[r.get("passed")]
        print(
            f"{r['codec']:<10} {r['identical']:>5}/{n:<3} {r['greedy_agreement']:>10.1%}"
            f" {'' if model is None else f'{model:.1%}':>7} {r['identical_cold']:>4}/{n:<3}"
            f" {r['greedy_agreement_cold']:>7.1%} {r['accuracy']:>9.1%}"
            f" {r['hit_tokens'] / max(r['prompt_tokens'], 1):>6.1%} {verdict:>6}"
        )
    print(
        f"served: a codec passes when its greedy agreement with the raw chunks' answers is at"
        f" most {MARGIN:.0%} below the model-level measure's ('model'); 'vs cold': the same"
        " against the cold server, which computed each context whole (bf16's rounding of"
        " another split into steps moves answers too); 'hit': prompt tokens loaded"
    )
