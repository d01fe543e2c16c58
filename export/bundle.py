"""Writes the bundle directory atomically: everything goes into a temp dir beside the target, renamed at the end.

Layout (the only contract with service/, described by manifest.json):
  manifest.json        format version, model config, I/O contract, tokenizer facts, files with sha256, parity, golden
  model.onnx           the graph;  model.onnx.data  its weights (external data)
  tokenizer.json       Hugging Face `tokenizers` format
  golden.npz           reference logits of the golden prompts (last prompt position), computed by this graph
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from export.errors import ExportError

FORMAT = "gpt-onnx-bundle"
FORMAT_VERSION = 2  # 2: fused graph, logits only at `logits_index`, rotary from seqlens_k (1: one logit per position)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_target(out: Path) -> Path:
    """The directory a bundle will replace, resolved: absent, empty, or a bundle; anything else (a checkpoint, a
    folder of bundles, the working directory) is refused before any work, never renamed away."""
    out = out.resolve()
    if not out.name:
        raise ExportError(f"--out {out}: name a directory for the bundle")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_bundle(out))):
        raise ExportError(
            f"--out {out}: exists and is not a bundle (no manifest.json of {FORMAT}); refusing to replace it: "
            "name a new directory or an earlier bundle"
        )
    return out


def _is_bundle(directory: Path) -> bool:
    try:
        return json.loads((directory / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temp dir next to `out`; on success it replaces `out`, on any error it is removed and `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # readable by the service's non-root user
        for p in tmp.iterdir():
            p.chmod(0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Adds the sha256 and size of every other file, then writes manifest.json."""
    files = {
        p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest
