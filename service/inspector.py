"""The inspection graph's onnxruntime session: token ids in, attention probabilities and next-token logits out.

Arrays only, like the engine. The session is opened on first use, not at start: it reads the weights of the
serving graph's data file a second time (about the model's size in memory), which a server nobody inspects
should not pay.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from service.bundle import InspectGraph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inspection:
    attention: np.ndarray  # (n_layer, n_head, T, T) float32: [l, h, q, k], rows sum to 1, 0 above the diagonal
    logits: np.ndarray  # (T, V) float32: the next-token logits at every position


class Inspector:
    def __init__(self, graph: InspectGraph, providers: list[str], threads: int = 0) -> None:
        self.graph, self.providers, self.threads = graph, providers, threads
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Loads the session once (blocking, a few seconds for the default model); later calls return at once."""
        with self._lock:
            if self._session is not None:
                return
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(self.graph.file), options, providers=self.providers)
            log.info("inspection graph loaded from %s", self.graph.file)

    def run(self, token_ids: list[int]) -> Inspection:
        """One prompt of at most `graph.max_tokens` tokens. Call `open()` first (not on the engine thread)."""
        if self._session is None:
            raise RuntimeError("Inspector.run before open()")
        ids = np.asarray([token_ids], dtype=np.int64)  # (1, T)
        logits, attention = self._session.run(["logits", "attention"], {"input_ids": ids})
        return Inspection(attention=attention, logits=logits[0])


def top_tokens(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the vocabulary at every position, then the k most likely: ids (T, k), probs (T, k), best first."""
    if k == 0:
        return np.zeros((len(logits), 0), np.int64), np.zeros((len(logits), 0), np.float32)
    z = logits - logits.max(-1, keepdims=True)  # (T, V)
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argpartition(-probs, k - 1, axis=-1)[:, :k]  # (T, k), unordered
    top = np.take_along_axis(probs, ids, -1)
    order = np.argsort(-top, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(top, order, -1)
