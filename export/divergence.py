"""How far a quantized bundle's next-token distributions sit from a reference bundle's, over whole texts.

    python -m export.divergence --reference bundles/smollm2-135m bundles/smollm2-135m-int4 [--text FILE ...]

Each text (default: the export's held-out text) is cut to its first `--tokens` tokens and run through every
bundle's graph in one prefill with every position's logits; per bundle and text it prints the mean KL divergence
KL(reference || bundle) over the positions, the perplexity ratio to the reference and the top-1 agreement. The
parity report of an export is one text; this is for comparing quantizations more widely (docs/EXPORT.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from export.config import ModelConfig
from export.parity import HELDOUT, OrtRunner, log_softmax, perplexity_from_logits


def all_logits(bundle: Path, texts: list[list[int]]) -> list[np.ndarray]:
    """(S, V) float64 logits at every position of each text."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    runner = OrtRunner(bundle / manifest["graph"]["file"], ModelConfig.from_dict(manifest["model"]))
    out = []
    for ids in texts:
        S = len(ids)
        logits, _ = runner.forward(runner.new_cache(1, S), np.array([ids]), np.arange(S)[None], np.array([S - 1]), S)
        out.append(logits[0].astype(np.float64))
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m export.divergence", description=__doc__.splitlines()[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--reference", type=Path, required=True, help="the bundle compared against (fp32)")
    p.add_argument("--text", type=Path, action="append", help="a text file (repeatable; default: the held-out text)")
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args()
    files = args.text or [HELDOUT]
    for bundle in (args.reference, *args.bundles):
        if not (bundle / "manifest.json").is_file():
            p.error(f"{bundle}: not a bundle (no manifest.json)")
    for f in files:
        if not f.is_file():
            p.error(f"{f}: no such text file")
    if args.tokens < 2:
        p.error("--tokens: at least 2")
    tokenizer = Tokenizer.from_file(str(args.reference / "tokenizer.json"))
    texts = [tokenizer.encode(f.read_text()).ids[: args.tokens] for f in files]
    reference = [log_softmax(x) for x in all_logits(args.reference, texts)]
    for bundle in args.bundles:
        for f, ids, ref, logits in zip(files, texts, reference, all_logits(bundle, texts)):
            kl = (np.exp(ref) * (ref - log_softmax(logits))).sum(-1).mean()
            ppl = perplexity_from_logits(logits, ids) / perplexity_from_logits(ref, ids)
            top1 = (ref.argmax(-1) == logits.argmax(-1)).mean()
            row = {"bundle": str(bundle), "text": f.name, "tokens": len(ids), "kl": round(float(kl), 5)}
            print(json.dumps({**row, "ppl_ratio": round(ppl, 4), "top1": round(float(top1), 4)}))


if __name__ == "__main__":
    main()
