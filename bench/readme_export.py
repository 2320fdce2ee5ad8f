"""Print the ONNX parity table from metrics/export_onnx.json and metrics/register.json (`make run`).

`make readme` writes the same table into docs/export-and-registry.md; the code lives in llmcarve.readme.

    python bench/readme_export.py metrics/export_onnx.json metrics/register.json
"""

from __future__ import annotations

import json
import sys

from llmcarve.readme import onnx_table

if __name__ == "__main__":
    exported = json.load(open(sys.argv[1]))["models"]
    registered = json.load(open(sys.argv[2]))["models"] if len(sys.argv) > 2 else {}
    print(onnx_table(exported, registered))
