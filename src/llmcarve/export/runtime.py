"""Run an exported model in onnxruntime alone: a forward over a cache, and greedy generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from llmcarve.export.onnx import OnnxExport


class OnnxCausalLM:
    """An onnxruntime CPU session over an export's graph; caches are lists of numpy arrays."""

    def __init__(self, export: OnnxExport | str | Path, threads: int | None = None):
        self.export = export if isinstance(export, OnnxExport) else OnnxExport.load(export)
        options = ort.SessionOptions()
        if threads:
            # The same thread count as PyTorch, so the latencies compare engines rather than cores.
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.export.path), options, providers=["CPUExecutionProvider"])

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A past of length 0: what the graph takes for prefill."""
        return [
            np.zeros((batch, layer.kv_heads, 0, width), dtype=np.float32)
            for layer in self.export.layers
            for width in (layer.key_dim, layer.value_dim)
        ]

    def __call__(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [batch, length, vocab] for `input_ids` after `past`, and the extended cache."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        feeds = dict(zip(self.export.inputs, [input_ids, *past]))
        logits, *presents = self.session.run(self.export.outputs, feeds)
        return logits, presents

    def greedy(self, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """`new_tokens` argmax tokens after `prompt` [batch, length], and the logits that chose each."""
        logits, past = self(prompt)
        tokens, chosen_from = [], []
        for _ in range(new_tokens):
            last = logits[:, -1]
            token = last.argmax(-1)[:, None]
            tokens.append(token)
            chosen_from.append(last)
            if len(tokens) < new_tokens:
                logits, past = self(token, past)
        return np.concatenate(tokens, axis=1), chosen_from
