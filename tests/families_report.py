"""The per-family parity table of docs/EXPORT.md: `python -m tests.families_report`.

Writes each case of tests/e2e/test_families.py (a tiny random checkpoint per family and source format), exports it
with `python -m export` and prints one Markdown row per case from the bundle's parity report.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tests.e2e.test_families import CASES, write_source
from tests.helpers import run_cli

try:  # save_pretrained progress bars would interleave with the table
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass


def main() -> int:
    print("| family | source | arch in manifest | fp32 max abs logit diff | top-1 (greedy) agreement | stop ids |")
    print("|---|---|---|---|---|---|")
    for family, source in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            path, _, _ = write_source(Path(tmp), family, source)
            out = Path(tmp) / "bundle"
            result = run_cli("export", "--source", str(path), "--out", str(out), "--max-context", "1024")
            if result.returncode != 0:
                print(f"| {family} | {source} | export failed: {result.stderr.strip()} | | | |")
                continue
            m = json.loads((out / "manifest.json").read_text())
            p = m["parity"][0]
            print(
                f"| {family} | {source} | {m['model']['arch']} | {p['max_abs_diff']:.1e} | {p['top1_agreement']:.1%} "
                f"| {m['tokenizer']['eos_token_ids']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
