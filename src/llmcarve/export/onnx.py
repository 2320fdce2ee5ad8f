"""Export a dense or carved causal LM to one ONNX decoder graph (see `graph`), with a manifest.

Exporter: `torch.export.export(strict=False)` captures the graph, then `torch.onnx.export(dynamo=True)`
translates it. Capturing ourselves, rather than handing the module to `torch.onnx.export`, keeps the
capture to one strategy: the ONNX exporter would retry a failed capture in strict mode and, with its
draft-export flag set, accept a graph specialised to the example input, which is how a data-dependent
expert loop loses experts without an error. Dynamo exports every model kind here (dense Llama/Qwen2,
carved static, ToMoE MoE with the dynamic V mask), so the legacy TorchScript exporter is not used.

The directory holds `model.onnx` (plus `model.onnx.data` when the weights go to external data) and
`export.json`, which names the inputs/outputs and gives each layer's cache shape, so onnxruntime
needs nothing from PyTorch to generate.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from llmcarve.export.graph import INPUT_IDS, LOGITS, CausalLMGraph, LayerCache, export_ready, layer_caches, past_names, present_names
from llmcarve.io import atomic_directory
from llmcarve.models.adapters import adapter_for
from llmcarve.models.loading import load_model

log = logging.getLogger(__name__)

MODEL_FILE, MANIFEST_FILE = "model.onnx", "export.json"
# Protobuf caps one serialised message at 2 GiB (2**31 bytes); a graph whose weights alone are over
# 2 GB (10**9) keeps them in a side file instead, leaving the rest of the 2 GiB for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 10**9
# Opset 18 is the one stack.md verified on onnxruntime 1.31 with both exporters.
OPSET = 18
EXPORTER = "torch.export.export(strict=False) + torch.onnx.export(dynamo=True)"


@dataclass
class OnnxExport:
    """An exported model directory, as described by its manifest."""

    directory: Path
    layers: list[LayerCache]
    vocab_size: int
    model_type: str
    external_data: bool
    parameter_bytes: int
    exporter: str = EXPORTER
    opset: int = OPSET
    optimized: bool = False
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def file_bytes(self) -> int:
        """The graph file plus its external data file, if any."""
        return sum(path.stat().st_size for path in self.directory.glob(f"{MODEL_FILE}*"))

    def manifest(self) -> dict:
        manifest = asdict(self)
        del manifest["directory"]
        return manifest

    @classmethod
    def load(cls, directory: str | Path, manifest: str | Path | None = None) -> "OnnxExport":
        """The export in `directory`; `manifest` when its export.json lies elsewhere (an MLflow download
        keeps it under extra_files/)."""
        manifest = json.loads(Path(manifest or Path(directory) / MANIFEST_FILE).read_text(encoding="utf-8"))
        manifest["layers"] = [LayerCache(**layer) for layer in manifest["layers"]]
        return cls(directory=Path(directory), **manifest)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, a tied tensor (embedding == LM head) counted once."""
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in model.state_dict().values()}
    return sum(storages.values())


def as_model(model: nn.Module | str | Path) -> nn.Module:
    """An in-memory model, or a saved directory loaded the project's way: safetensors only, no code
    from the directory (trust_remote_code=False), a supported family, float32."""
    if isinstance(model, nn.Module):
        return model
    return load_model(model, dtype="float32")[0]


@contextmanager
def _quiet_exporter():
    """Silence what the exporter says on every export that nobody can act on: the ONNX optimiser's
    INFO log of each pass and skipped fold (about a hundred lines, which would bury the stage's own
    log), the note that an axis name shared by several inputs is used once, and torch.export's own
    pytree deprecation warning."""
    loggers = {name: logging.getLogger(name) for name in ("onnxscript", "onnx_ir")}
    levels = {name: logger.level for name, logger in loggers.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)", category=FutureWarning)
        for logger in loggers.values():
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, logger in loggers.items():
                logger.setLevel(levels[name])


def export_onnx(
    model: nn.Module | str | Path,
    out_dir: str | Path,
    *,
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    opset: int = OPSET,
    optimize: bool = False,
) -> OnnxExport:
    """Export `model` (an in-memory model or a saved model directory) to `out_dir` and return its description.

    `out_dir` is replaced as a whole, and only once the graph has passed `onnx.checker`.
    `optimize` runs onnxscript's rewriter over the graph. Off by default: on SmolLM2-135M (2-core CPU)
    it doubled the export (169 s against 81 s) and onnxruntime ran the result no faster (prefill
    386 against 396 tokens/s, decode 25.1 against 25.2), because onnxruntime fuses the same
    patterns itself when it loads a graph.
    """
    model = as_model(model)
    adapter_for(model.config)  # a clear error for a family the graph wrapper does not know
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        # onnxruntime's CPU kernels lack most bf16/fp16 ops, and parity is defined in fp32.
        raise ValueError(f"export a float32 model (got {dtype}); load it with dtype='float32'")
    graph, layers = CausalLMGraph(model), layer_caches(model)
    weights = parameter_bytes(model)
    description = OnnxExport(
        directory=Path(out_dir),
        layers=layers,
        vocab_size=model.config.vocab_size,
        model_type=model.config.model_type,
        external_data=weights > external_data_threshold_bytes,
        parameter_bytes=weights,
        opset=opset,
        optimized=optimize,
        inputs=[INPUT_IDS, *past_names(len(layers))],
        outputs=[LOGITS, *present_names(len(layers))],
    )
    log.info("exporting %s (%d layers, %d parameter bytes) to ONNX", model.config.model_type, len(layers), weights)
    dynamic_shapes = graph.dynamic_shapes()
    with _quiet_exporter():
        with export_ready(model), torch.no_grad():
            program = torch.export.export(graph, graph.example_inputs(), dynamic_shapes=dynamic_shapes, strict=False)
        onnx_program = torch.onnx.export(
            program,
            opset_version=opset,
            dynamo=True,
            optimize=optimize,
            input_names=description.inputs,
            output_names=description.outputs,
            dynamic_shapes=dynamic_shapes,  # only to name the graph's axes (batch, sequence, past_sequence)
        )
        with atomic_directory(out_dir) as staging:
            onnx_program.save(staging / MODEL_FILE, external_data=description.external_data)
            onnx.checker.check_model(str(staging / MODEL_FILE))  # by path: the checker then reads external data too
            (staging / MANIFEST_FILE).write_text(json.dumps(description.manifest(), indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s (%d bytes, external data: %s)", description.path, description.file_bytes, description.external_data)
    return description
