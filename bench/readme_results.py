"""Print the results table of metrics/evaluate.json (the committed results of `make run`).

`make readme` writes it, with its caption, into README.md (llmcarve.readme, block `cpu-results`).

    python bench/readme_results.py metrics/evaluate.json
"""

from __future__ import annotations

import json
import sys

from llmcarve.eval.report import markdown_table

if __name__ == "__main__":
    print(markdown_table(json.load(open(sys.argv[1]))["models"]))
