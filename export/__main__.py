"""CLI: load -> convert -> export -> verify -> (quantize) -> write, printing each phase and a parity report.

python -m export --source default --out bundles/smollm2-135m
python -m export --source path/to/hf-dir --out bundles/my-gpt2
python -m export --source path/to/model.gguf --out bundles/my-model --quantize int4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import ortkernels
from export.errors import ExportError

log = logging.getLogger("export")

GOLDEN_STEPS = 16
GOLDEN_ATOL = {"fp32": 1e-2, "fp16": 0.5, "int8": 1.0, "int4": 1.0}  # service-side check, any provider


def kernel_ops(graph_file: Path) -> list[str]:
    """The names of the ortkernels/ ops a graph's nodes use."""
    import onnx

    nodes = onnx.load(str(graph_file), load_external_data=False).graph.node
    return sorted({n.op_type for n in nodes if n.domain == ortkernels.DOMAIN})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export", description="Export a GPT-2, Llama, Qwen2 or Mistral checkpoint to an ONNX bundle."
    )
    p.add_argument("--source", required=True, help="'default' (SmolLM2-135M-Instruct), a .gguf file or a HF directory")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write (replaced atomically)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
    p.add_argument(
        "--max-context", type=int, default=None, help="longest sequence the bundle serves (default: the model's)"
    )
    p.add_argument(
        "--int4-accuracy-level",
        type=int,
        choices=[0, 1, 2, 3, 4],
        default=4,
        help="MatMulNBits compute precision on CPU: 4 = int8 activations (fast, like llama.cpp), 0 = fp32",
    )
    p.add_argument(
        "--int4-kernel",
        choices=["auto", "matmulnbits"],
        default="auto",
        help="a GGUF's Q4_0/Q4_1 blocks at accuracy level 4: auto = this project's MatMulQ4_1 where ortkernels/ is "
        "built (Q4_1's own bytes, one node a projection), else onnxruntime's MatMulNBits (plus nodes for the minimum)",
    )
    p.add_argument(
        "--kernels",
        choices=["auto", "none"],
        default="auto",
        help="fp32 graphs (and their int8/int4 forms), for the CPU: auto = this project's own ops where ortkernels/ is "
        "built (CausalAttention, SwiGLU, MatMulQ4_1), else onnxruntime's; none = onnxruntime's ops only. fp16: none",
    )
    p.add_argument(
        "--int4-source",
        choices=["auto", "requantize"],
        default="auto",
        help="auto: a GGUF's own Q4_0/Q4_1 blocks when it has them; requantize: from the fp32 weights",
    )
    p.add_argument(
        "--max-inspect-tokens",
        type=int,
        default=256,
        help="longest prompt of the inspection graph (attention probabilities and logits at every position); "
        "0: no inspection graph. Not written for quantized bundles",
    )
    p.add_argument("--name", default=None, help="model name served by the API (default: from the checkpoint)")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def use_kernels(args: argparse.Namespace, graph: Path) -> None:
    """An fp32 graph onto ortkernels/' CausalAttention and SwiGLU, where the library is built (export/kernels.py)."""
    from export import kernels

    if args.dtype != "fp32" or args.kernels != "auto":
        return
    if not ortkernels.available():
        print(f"      ortkernels/ is not built ({ortkernels.BUILD_HINT}): onnxruntime's own ops", flush=True)
        return
    counts = kernels.rewrite(graph)
    print(f"      ortkernels/: {', '.join(f'{n} {op}' for op, n in counts.items())}", flush=True)


class Phases:
    """Prints `[k/n] phase: detail` and timing lines to stdout (errors alone go to stderr)."""

    def __init__(self, total: int) -> None:
        self.k, self.total, self.t0 = 0, total, time.perf_counter()

    def start(self, name: str, detail: str = "") -> None:
        self.k += 1
        self.t0 = time.perf_counter()
        print(f"[{self.k}/{self.total}] {name}{': ' + detail if detail else ''} ...", flush=True)

    def done(self, detail: str = "") -> None:
        print(f"      done in {time.perf_counter() - self.t0:.1f}s{'  ' + detail if detail else ''}", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch
    from tokenizers import Tokenizer

    from export import bundle, inspection, parity, quantize
    from export.checkpoints import build_model, load
    from export.onnx_export import OPSET, export_onnx, io_contract, save_model

    if args.quantize != "none" and args.dtype != "fp32":
        raise ExportError("--quantize int8/int4 starts from fp32 weights: use it with --dtype fp32")
    target = bundle.check_target(args.out)
    phases = Phases(6 if args.quantize != "none" else 5)

    phases.start("load", args.source)
    ckpt = load(args.source)
    cfg = ckpt.config
    max_context = min(args.max_context or cfg.max_context, cfg.max_context)
    if max_context < 16:
        raise ExportError(f"--max-context {args.max_context} is too small (at least 16)")
    if args.max_inspect_tokens < 0:
        raise ExportError(f"--max-inspect-tokens {args.max_inspect_tokens}: 0 (none) or a positive length")
    if cfg.sliding_window is not None and cfg.sliding_window < max_context:
        raise ExportError(
            f"{args.source}: sliding_window {cfg.sliding_window} is smaller than the exported context {max_context} "
            f"and sliding-window attention is not implemented: export with --max-context {cfg.sliding_window}"
        )
    phases.done(
        f"{cfg.arch or cfg.family}, {cfg.n_layer} layers, d_model {cfg.d_model}, "
        f"heads {cfg.n_head}/{cfg.n_kv_head} kv, vocab {cfg.vocab_size}"
    )

    phases.start("convert", "torch model")
    model = build_model(ckpt)
    tokenizer = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json)
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    prompts = [encode(t) for t in parity.PROMPTS]
    held = parity.heldout_ids(encode, min(512, max_context))
    reference = parity.torch_reference(model, prompts, GOLDEN_STEPS)
    ref_ppl = parity.torch_perplexity(model, held)
    inspect_tokens = min(args.max_inspect_tokens, max_context) if args.quantize == "none" else 0
    inspect_prompts = [*prompts, held[:inspect_tokens]] if inspect_tokens > 0 else []
    inspect_expected = inspection.reference(model, inspect_prompts)  # fp32, before the export casts the model
    phases.done(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; torch fp32 perplexity {ref_ppl:.3f}"
    )

    reports: list[parity.ParityReport] = []
    with bundle.staging(target) as tmp:
        work = tmp / "work"
        work.mkdir()
        phases.start("export", f"ONNX opset {OPSET}, {args.dtype}")
        graph = work / "model.onnx"
        export_onnx(model, graph, torch.float16 if args.dtype == "fp16" else torch.float32)
        if args.quantize == "none":
            use_kernels(args, graph)
        phases.done(f"{sum(f.stat().st_size for f in work.iterdir()) / 1e6:.0f} MB")

        phases.start(
            "verify",
            f"onnxruntime vs torch: prefill + {GOLDEN_STEPS} decode steps, "
            f"{len(prompts)} rows of lengths {[len(p) for p in prompts]}",
        )
        report = parity.verify(args.dtype, graph, cfg, reference, prompts, held, ref_ppl)
        reports.append(report)
        print("      " + report.line(), flush=True)
        if not report.passed():
            raise ExportError(f"parity check failed for {args.dtype}: {report.line().strip()}")
        phases.done()

        final = graph
        variant = args.dtype
        if args.quantize != "none":
            phases.start("quantize", args.quantize)
            final = work / f"model.{args.quantize}.onnx"
            if args.quantize == "int8":
                quantize.quantize_int8(graph, final)
                variant = "int8"
            elif ckpt.packed and args.int4_source == "auto":
                q4_1_kernel = args.kernels == "auto" and args.int4_kernel == "auto" and ortkernels.available()
                if args.kernels == "auto" and args.int4_kernel == "auto" and not q4_1_kernel:
                    print(f"      ortkernels/ is not built ({ortkernels.BUILD_HINT}): MatMulNBits instead", flush=True)
                n = quantize.carry_gguf_blocks(graph, final, ckpt.packed, args.int4_accuracy_level, q4_1_kernel)
                variant = "int4-gguf"
                op = "MatMulQ4_1" if kernel_ops(final) else "MatMulNBits"
                print(f"      carried {n} GGUF-quantized tensors (Q4_0/Q4_1/Q8_0 blocks) into {op} as they are")
            else:
                quantize.quantize_int4(graph, final, args.int4_accuracy_level)
                variant = "int4"
            use_kernels(args, final)
            report = parity.verify(variant, final, cfg, reference, prompts, held, ref_ppl)
            reports.append(report)
            print("      " + report.line(), flush=True)
            if not report.passed():
                raise ExportError(f"parity check failed for {variant}: {report.line().strip()}")
            phases.done()

        phases.start("write", str(args.out))
        runner = parity.OrtRunner(final, cfg)
        golden_prompts = prompts[:3]
        golden = [runner.greedy(p, GOLDEN_STEPS) for p in golden_prompts]
        golden_tokens = [tokens for tokens, _ in golden]
        golden_logits = np.stack([logits for _, logits in golden])  # (P, V)
        del runner
        np.savez(tmp / "golden.npz", last_logits=golden_logits.astype(np.float32))
        save_model(onnx.load(str(final)), tmp / "model.onnx")
        inspect = None
        if inspect_prompts:
            inspect = inspection.write(model, tmp, work, inspect_prompts, inspect_expected, args.dtype, inspect_tokens)
            print(f"      inspection graph: {inspection.summary(inspect)}", flush=True)
        shutil.rmtree(work)
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer.tokenizer_json)
        cache_dtype = "float16" if args.dtype == "fp16" else "float32"
        ops = kernel_ops(tmp / "model.onnx")
        manifest = {
            "name": args.name or ckpt.name,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": ckpt.source,
            "model": cfg.to_dict(),
            "dtype": args.dtype,
            "quantization": args.quantize if variant != "int4-gguf" else "int4 (GGUF blocks carried over)",
            "max_context": max_context,
            "generation_defaults": ckpt.generation_defaults,
            # the project's own ops the graph runs (ortkernels/): a service without them refuses the bundle by name
            "graph": {
                "file": "model.onnx",
                "kernels": ops,
                **io_contract(cfg, cache_dtype, addressed="CausalAttention" in ops),
            },
            "tokenizer": {
                "file": "tokenizer.json",
                **ckpt.tokenizer.special_tokens(),
                "chat_template": ckpt.tokenizer.chat_template,
            },
            "golden": {
                "file": "golden.npz",
                "prompts": golden_prompts,
                "greedy_tokens": golden_tokens,
                "logits_atol": GOLDEN_ATOL[args.quantize if args.quantize != "none" else args.dtype],
            },
            "parity": [r.to_dict() for r in reports],
            **({"inspect": inspect} if inspect else {}),
            "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        }
        manifest = bundle.write_manifest(tmp, manifest)
        phases.done()
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        manifest = run(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no bundle was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless --verbose
        if args.verbose:
            raise
        print(
            f"error: export failed ({type(exc).__name__}): {exc} (rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1
    print("parity report")
    from export.parity import ParityReport

    for r in manifest["parity"]:
        print("  " + ParityReport.from_dict(r).line())
    print(
        f"bundle written: {args.out} ({manifest['name']}, {manifest['dtype']}, quantization {manifest['quantization']})"
    )
    print(json.dumps({"bundle": str(args.out), "files": {k: v["bytes"] for k, v in manifest["files"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
