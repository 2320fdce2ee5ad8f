"""The DVC workspace a flow run works in: a clone of the project, never the user's checkout.

Why a clone: a scheduled run must not rewrite the user's params.yaml or dvc.lock, and two runs must
never share one DVC workspace. Each project gets one flow workspace (a git clone that shares the
project's DVC cache), used by one run at a time under an exclusive file lock. It is kept between runs,
so DVC skips unchanged stages and a killed training stage resumes from its persisted checkpoints.

A run: lock -> fetch the project's committed HEAD -> write the overridden params.yaml -> stages run
with `dvc repro --single-item` -> `dvc exp save` names the result -> `dvc exp push` hands the
experiment ref to the project, where `dvc exp show` lists it and `dvc exp apply` restores it.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from ruamel.yaml import YAML

from llmcarve.params import apply_overrides, validate

WORKSPACE_ENV = "LLMCARVE_FLOW_WORKSPACE"


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the stage's own last words."""

    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode = stage, returncode
        super().__init__(f"stage '{stage}' failed (exit {returncode}):\n{tail}")

    @property
    def killed(self) -> bool:
        """Killed from outside (OOM killer, preemption): SIGKILL/SIGTERM, seen directly or through a shell."""
        return self.returncode in (-9, -15, 137, 143)

    @property
    def transient(self) -> bool:
        """Killed from outside or DVC's lock held by another process.

        Only these are worth a retry; a stage that raised an error raises it again.
        """
        return self.killed or "is busy, it is being blocked by" in str(self)


def default_location(project: Path) -> Path:
    """Outside the project, so neither pytest, git nor DVC of the project ever walks into it."""
    if os.environ.get(WORKSPACE_ENV):
        return Path(os.environ[WORKSPACE_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    tag = hashlib.sha1(str(project.resolve()).encode()).hexdigest()[:8]
    return cache / "llmcarve" / "flow-workspaces" / f"{project.resolve().name}-{tag}"


def dvc_executable() -> str:
    # The worker's interpreter is the project's venv; its `dvc` sits next to it.
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else "dvc"


@dataclass
class FlowWorkspace:
    project: Path
    path: Path

    @classmethod
    def for_project(cls, project: str | Path, location: str | Path | None = None) -> "FlowWorkspace":
        project = Path(project).resolve()
        if not (project / ".git").exists() or not (project / "dvc.yaml").exists():
            raise ValueError(f"{project} is not an llmcarve checkout (needs .git and dvc.yaml)")
        return cls(project, Path(location).resolve() if location else default_location(project))

    @contextmanager
    def locked(self, on_wait: Callable[[str], None] = print) -> Iterator["FlowWorkspace"]:
        """Exclusive use of the workspace; a second run waits here until the first has finished."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait(f"workspace {self.path} is in use by another run; waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield self

    def git(self, *args: str, cwd: Path | None = None) -> str:
        done = subprocess.run(["git", *args], cwd=cwd or self.path, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def dvc(self, *args: str) -> str:
        done = subprocess.run([dvc_executable(), *args], cwd=self.path, capture_output=True, text=True, env=self.env())
        if done.returncode:
            raise RuntimeError(f"dvc {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        return done.stdout.strip()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # No HF_HUB_OFFLINE here: each stage goes offline unless its params need the hub, and a value the
        # worker's environment sets wins (stages/common.py, `hub_offline_env`).
        env = dict(os.environ, DVC_NO_ANALYTICS="1")
        # Stage commands say `python`: it must be this interpreter (the project's venv), whatever PATH a worker has.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return {**env, **(extra or {})}

    def sync(self) -> str:
        """Bring the workspace to the project's committed HEAD; keep ignored outputs and checkpoints."""
        if not (self.path / ".git").exists():
            self.git("clone", "--quiet", "--no-checkout", str(self.project), str(self.path), cwd=self.path.parent)
        # `dvc exp save` commits; a worker host need not have a git identity, so the clone gets one
        if subprocess.run(["git", "config", "user.email"], cwd=self.path, capture_output=True).returncode:
            self.git("config", "user.name", "llmcarve flow")
            self.git("config", "user.email", "llmcarve-flow@localhost")
        self.git("fetch", "--quiet", "origin", "HEAD")
        self.git("reset", "--quiet", "--hard", "FETCH_HEAD")
        # One DVC cache for the project and its flow runs: results computed here are the project's.
        self.dvc("cache", "dir", "--local", str(self.project / ".dvc" / "cache"))
        self.dvc("config", "--local", "cache.type", "reflink,hardlink,copy")
        return self.git("rev-parse", "HEAD")

    def write_params(self, overrides: dict[str, Any]) -> None:
        """Apply overrides to the committed params.yaml (comments kept) after validating the result."""
        params_file = self.path / "params.yaml"
        round_trip = YAML()
        document = round_trip.load(params_file.read_text())
        apply_overrides(document, overrides)
        buffer = io.StringIO()
        round_trip.dump(document, buffer)
        validate(yaml.safe_load(buffer.getvalue()), f"params.yaml with overrides {overrides}")
        params_file.write_text(buffer.getvalue())

    def stage_names(self) -> list[str]:
        """Stages in dvc.yaml order, which lists every stage after the stages it depends on."""
        return list(yaml.safe_load((self.path / "dvc.yaml").read_text())["stages"])

    def run_stage(self, stage: str, env: dict[str, str], log: Callable[[str], None], tail_lines: int = 40) -> None:
        """`dvc repro --single-item <stage>`: DVC decides whether it runs or is skipped as unchanged."""
        command = [dvc_executable(), "repro", "--single-item", stage]
        process = subprocess.Popen(
            command, cwd=self.path, env=self.env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        tail: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            # Progress bars redraw with carriage returns; only their final state is worth a log line.
            line = line.rstrip("\n").split("\r")[-1]
            if line.strip():
                log(line)
                tail = (tail + [line])[-tail_lines:]
        returncode = process.wait()
        if returncode:
            raise StageFailed(stage, returncode, "\n".join(tail))

    def save_experiment(self, name: str) -> str:
        """Name the result a DVC experiment and hand it to the project's git repository."""
        self.dvc("exp", "save", "--force", "--name", name)
        self.dvc("exp", "push", "--force", "--no-cache", "origin", name)
        return name

    def read_json(self, relative: str) -> dict:
        import json

        return json.loads((self.path / relative).read_text())

