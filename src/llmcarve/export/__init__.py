"""ONNX export of every model llmcarve produces (dense Llama/Qwen2 and carved models), checked against PyTorch.

    export = export_onnx(model_or_dir, "artifacts/export/onnx")    # model.onnx (+ .data), export.json
    report = check_parity(model_or_dir, export)                    # JSON-able: logits, greedy, size, speed

The graph (`graph`) takes `input_ids` and a flat per-layer past, and returns logits and the presents;
a past of length 0 is prefill. `runtime.OnnxCausalLM` runs it, greedy generation included, in
onnxruntime alone. A directory is loaded only through `llmcarve.models.loading.load_model`
(safetensors, trust_remote_code=False): exporting never runs code that came with a model.

Not supported: a padding `attention_mask` input. Batch rows must share one length. The carved
model decides "padded or not" with a data-dependent branch (`attention_mask_for`), which a traced
graph cannot take, and stack.md found the dynamo graph off at padding positions for dense models.
"""

from llmcarve.export.onnx import EXTERNAL_DATA_THRESHOLD_BYTES, OnnxExport, export_onnx
from llmcarve.export.parity import check_parity
from llmcarve.export.runtime import OnnxCausalLM

__all__ = ["EXTERNAL_DATA_THRESHOLD_BYTES", "OnnxCausalLM", "OnnxExport", "check_parity", "export_onnx"]
