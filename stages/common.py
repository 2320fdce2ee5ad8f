"""What every stage entry point shares: argument parsing, params validation, clean failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from llmcarve.params import Params, ParamsError, load_params

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
PLOTS = Path("plots")


def main(run: Callable[[Params], None], description: str) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Everything the pipeline reads is local; never wait on a hub that cannot be reached.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        params = load_params(args.params)  # before anything is loaded or written
    except ParamsError as error:
        sys.exit(f"error: {error}")
    run(params)
