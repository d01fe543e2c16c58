"""CLI: a prompt's attention heatmaps and next-token distribution as PNG files, from a bundle, without a server.

python -m service.inspect --prompt "The quick brown fox" [--bundle bundles/smollm2-135m] [--layers 0,16] [--heads 0]
make inspect PROMPT="The quick brown fox"

Writes one PNG per layer (its heads side by side, rows = query tokens, columns = key tokens) and next-tokens.png
(the most likely next tokens at --position, default the last). Needs matplotlib (the dev extra), not the service.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from service.bundle import BundleError, load_bundle
from service.inspector import Inspector, top_tokens
from service.tokenizer import TextTokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.inspect", description=__doc__.split("\n")[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--bundle", type=Path, default=Path("bundles/smollm2-135m"))
    p.add_argument("--layers", default="all", help="comma-separated layer indices, or 'all'")
    p.add_argument("--heads", default="all", help="comma-separated head indices, or 'all'")
    p.add_argument("--position", type=int, default=-1, help="position of the next-token chart (default: the last)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("results/inspect"))
    return p.parse_args(argv)


def indices(spec: str, n: int, name: str) -> list[int]:
    if spec == "all":
        return list(range(n))
    picked = [int(x) for x in spec.split(",") if x.strip()]
    if not picked or any(not 0 <= i < n for i in picked):
        raise ValueError(f"--{name} {spec}: indices in [0, {n})")
    return picked


def label(text: str) -> str:
    return text.replace("\n", "\\n").replace(" ", "\u00b7") or "\u2205"


def plot_layer(attention: np.ndarray, layer: int, heads: list[int], tokens: list[str], path: Path) -> None:
    """attention: (n_head, T, T) of one layer."""
    import matplotlib.pyplot as plt

    T, cols = len(tokens), min(len(heads), 3)
    rows = -(-len(heads) // cols)
    side = max(3.0, min(8.0, 0.22 * T + 1.5))
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for ax in axes.ravel()[len(heads) :]:
        ax.axis("off")
    show_labels = T <= 48
    for ax, h in zip(axes.ravel(), heads):
        ax.imshow(attention[h], cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer}, head {h}", fontsize=10)
        if show_labels:
            ax.set_xticks(range(T), [label(t) for t in tokens], rotation=90, fontsize=7)
            ax.set_yticks(range(T), [label(t) for t in tokens], fontsize=7)
        else:
            ax.set_xlabel("key position")
            ax.set_ylabel("query position")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_next(ids: np.ndarray, probs: np.ndarray, texts: list[str], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.35 * len(ids) + 1.2))
    ax.barh(range(len(ids)), probs, color="#2255cc")
    ax.set_yticks(range(len(ids)), [label(t) for t in texts], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    try:
        bundle = load_bundle(args.bundle, verify_checksums=False)
        if bundle.inspect is None:
            raise BundleError(f"{args.bundle}: no inspection graph (export it again with `python -m export`)")
        graph = bundle.inspect
        layers = indices(args.layers, graph.n_layer, "layers")
        heads = indices(args.heads, graph.n_head, "heads")
        tokenizer = TextTokenizer(bundle.tokenizer_file, bundle.chat_template, None, None)
        ids = tokenizer.encode(args.prompt)
        if not 0 < len(ids) <= graph.max_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens; the inspection graph reads 1 to {graph.max_tokens}")
        if not -len(ids) <= args.position < len(ids):
            raise ValueError(f"--position {args.position}: the prompt has {len(ids)} tokens")
    except (BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    inspector = Inspector(graph, ["CPUExecutionProvider"])
    inspector.open()
    result = inspector.run(ids)
    tokens = [tokenizer.token_text(i) for i in ids]
    args.out.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        path = args.out / f"layer-{layer:02d}.png"
        plot_layer(result.attention[layer], layer, heads, tokens, path)
        print(path)
    q = args.position % len(ids)
    top_ids, top_probs = top_tokens(result.logits[q : q + 1], args.top_k)
    path = args.out / "next-tokens.png"
    title = f"next token after position {q} ({tokens[q]!r})"
    plot_next(top_ids[0], top_probs[0], [tokenizer.token_text(int(i)) for i in top_ids[0]], title, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
