"""What every stage entry point shares: argument parsing, params validation, network policy, clean failures."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from llmcarve.errors import UserError
from llmcarve.params import Params, ParamsError, load_params

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
PLOTS = Path("plots")
LOGS = Path("logs")

DEBUG_ENV = "LLMCARVE_DEBUG"
OFFLINE_ENV = "LLMCARVE_OFFLINE"
HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_VALUES = {"1", "true", "yes", "on"}

log = logging.getLogger("llmcarve.stage")


def _user_facing_errors() -> tuple[type[BaseException], ...]:
    """Failures whose message says what to fix, so a traceback would only bury it.

    UserError is the library's own type; the others predate it and are just as user-facing.
    """
    from llmcarve.data.sources import SourceError
    from llmcarve.io import InsufficientDiskSpaceError
    from llmcarve.methods.training import NonFiniteLossError
    from llmcarve.models.adapters import UnsupportedModelError

    return (UserError, ParamsError, SourceError, UnsupportedModelError, InsufficientDiskSpaceError, NonFiniteLossError)


# ------------------------------------------------------------------------------------------------
# network: offline unless the params name something only the hub has


def _names_a_hub_dataset(value: Any) -> bool:
    if isinstance(value, Mapping):
        return bool(value.get("hf_id")) or any(_names_a_hub_dataset(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_names_a_hub_dataset(item) for item in value)
    return False


def needs_hub(params: Params) -> bool:
    """Whether the params name a hub model (`org/name`) or a hub dataset (`hf_id`) anywhere."""
    from llmcarve.models.loading import is_hub_id

    return is_hub_id(params.model.source) or _names_a_hub_dataset(params.model_dump())


def hub_offline_env(params: Params, environ: Mapping[str, str]) -> dict[str, str]:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for this stage, "1" or "0".

    Offline by default, so that the embedded model and local files never wait on a hub that cannot be
    reached; online when the params need the hub. What the user set wins: LLMCARVE_OFFLINE over both,
    else each variable the user set (TRANSFORMERS_OFFLINE counts for the hub, as huggingface_hub reads it;
    HF_DATASETS_OFFLINE follows the hub's unless set).
    """
    if environ.get(OFFLINE_ENV):
        value = "1" if environ[OFFLINE_ENV].strip().lower() in TRUE_VALUES else "0"
        return dict.fromkeys(HUB_OFFLINE_VARIABLES, value)
    hub = environ.get("HF_HUB_OFFLINE") or environ.get("TRANSFORMERS_OFFLINE") or ("0" if needs_hub(params) else "1")
    # datasets follows the hub setting unless told otherwise, as it does on its own
    return {"HF_HUB_OFFLINE": hub, "HF_DATASETS_OFFLINE": environ.get("HF_DATASETS_OFFLINE") or hub}


def apply_hub_offline(settings: Mapping[str, str]) -> None:
    """Set the variables, and the copies that huggingface_hub and datasets made of them when imported."""
    os.environ.update(settings)
    hub_offline = settings["HF_HUB_OFFLINE"].strip().lower() in TRUE_VALUES
    datasets_offline = settings["HF_DATASETS_OFFLINE"].strip().lower() in TRUE_VALUES
    # Both libraries read the variables once, at import; the stage module imported them before main ran.
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = hub_offline
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = datasets_offline


# ------------------------------------------------------------------------------------------------
# failures


def stage_name(run: Callable) -> str:
    """`prepare_model` for the `run` of stages/prepare_model.py, however it was started."""
    module = run.__module__
    if module == "__main__":  # `python -m stages.prepare_model` or `python stages/prepare_model.py`
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return module.rsplit(".", 1)[-1]


def write_failure_log(stage: str, error: BaseException) -> Path:
    """The full traceback of the failure, in logs/<stage>.log (overwritten by the next failure)."""
    LOGS.mkdir(exist_ok=True)
    (LOGS / ".gitignore").write_text("*\n")  # logs are local; neither git nor DVC should pick them up
    path = LOGS / f"{stage}.log"
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    path.write_text(f"{stamp} {' '.join(sys.argv)}\n" + "".join(traceback.format_exception(error)))
    return path


def debug_requested(flag: bool) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in TRUE_VALUES


def main(run: Callable[[Params], None], description: str) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--debug", action="store_true", help=f"print the full traceback of any failure (or set {DEBUG_ENV}=1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)  # before anything is loaded or written
    except ParamsError as error:
        sys.exit(f"error: {error}")
    apply_hub_offline(hub_offline_env(params, os.environ))
    try:
        run(params)
    except _user_facing_errors() as error:
        log_file = write_failure_log(stage_name(run), error)
        if debug_requested(args.debug):
            raise
        print(f"error: {error}", file=sys.stderr)
        print(f"(traceback in {log_file}; {DEBUG_ENV}=1 or --debug prints it)", file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # a bug: its traceback is the report, printed as usual
        write_failure_log(stage_name(run), error)
        raise
