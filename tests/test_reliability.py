"""What the pipeline does when things go wrong: a full disk, untrusted model files, a SIGKILLed stage.

The end-to-end tests run the real stage modules as subprocesses, on a tiny random Llama and a small
jsonl corpus, in a throwaway workspace (its own params.yaml, artifacts/, metrics/ and MLflow store).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llmcarve.io import InsufficientDiskSpaceError, atomic_directory, ensure_free_space, human_bytes
from llmcarve.models.loading import MODEL_DIR_HEADROOM_BYTES, PickledWeightsError, load_model, materialize, saved_model_bytes
from llmcarve.params import ParamsError, validate
from tests.project import offline_env
from tests.tiny import TRAINING_TEXT, save_tiny, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# --- shared helpers ---------------------------------------------------------------------------------

DiskUsage = namedtuple("DiskUsage", "total used free")  # what shutil.disk_usage returns


@contextmanager
def untracked(stage, params):
    """Stand-in for MLflow's stage_run in in-process stage tests."""

    class Tracker:
        def log_metrics(self, metrics, step=None):
            pass

    yield Tracker()


def params_for(workspace: Path, model_source: str) -> dict:
    """A small valid params mapping for a workspace that has corpus.jsonl."""
    return {
        "seed": 0,
        "model": {"source": model_source},
        "data": {
            "block_size": 32,
            "sources": {"notes": {"path": str(workspace / "corpus.jsonl")}},
            "domains": {"general": {"train": ["notes"], "heldout_fraction": 0.1}},
        },
        "calibrate": {"domain": "general", "num_blocks": 2, "batch_size": 2},
        "tomoe": {"budgets": [0.5], "device": "cpu", "seq_len": 32, "num_experts": 4, "lr": 0.02, "name_tolerance": 1.0},
        "static": {"budgets": [0.5]},
    }


def write_corpus(path: Path, documents: int = 60) -> None:
    # short documents (about 15 tokens, under one 32-token block each): packing joins them
    lines = [json.dumps({"text": f"{TRAINING_TEXT[i % 5]} Note {i}."}) + "\n" for i in range(documents)]
    path.write_text("".join(lines), encoding="utf-8")


def fake_free_space(monkeypatch, free: int) -> list[Path]:
    """Make every disk look like it has `free` bytes left; returns the paths that were asked about."""
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return DiskUsage(total=100 << 30, used=(100 << 30) - free, free=free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


# --- disk space -------------------------------------------------------------------------------------


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 << 20, 3 << 30, (3 << 30) + (1 << 29))] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 GiB", "3.5 GiB",
    ]


def test_free_space_check_names_needed_available_and_path(tmp_path, monkeypatch):
    asked = fake_free_space(monkeypatch, free=300 << 20)
    target = tmp_path / "artifacts" / "model"  # not created yet: its existing ancestor is checked
    ensure_free_space(target, 300 << 20, "the model")  # exactly enough is enough
    with pytest.raises(InsufficientDiskSpaceError) as error:
        ensure_free_space(target, 2 << 30, "the prepared model")
    message = str(error.value)
    for words in ("the prepared model", str(target), "needs about 2.0 GiB", "only 300.0 MiB available", "Free 1.7 GiB"):
        assert words in message
    assert asked == [tmp_path, tmp_path]
    assert not target.exists()


def test_saved_model_bytes_covers_what_save_pretrained_writes(tmp_path):
    model = tiny_llama()  # tied embeddings: the shared tensor is written once and must be counted once
    model.save_pretrained(tmp_path)
    weights = saved_model_bytes(model) - MODEL_DIR_HEADROOM_BYTES
    written = (tmp_path / "model.safetensors").stat().st_size
    assert written - 64 * 1024 <= weights <= written  # safetensors adds only a JSON header


def test_prepare_model_fails_before_writing_when_the_disk_is_short(tmp_path, monkeypatch):
    from stages import prepare_model

    source = save_tiny(tiny_llama(), tmp_path / "source")
    write_corpus(tmp_path / "corpus.jsonl")
    params = validate(params_for(tmp_path, source))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare_model, "stage_run", untracked)
    fake_free_space(monkeypatch, free=1 << 20)
    with pytest.raises(InsufficientDiskSpaceError, match=r"the prepared model .*needs about 6\d\.\d MiB, only 1\.0 MiB"):
        prepare_model.run(params)
    assert list((tmp_path / "artifacts").iterdir()) == []  # neither the model nor its staging directory
    assert not (tmp_path / "metrics").exists()


def carve_inputs(workspace: Path) -> None:
    """The artifacts the remove stage reads: the dense model, calibration stats, untrained ToMoE heads."""
    from llmcarve.calibration import collect_channel_stats
    from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
    from llmcarve.models.adapters import Geometry

    model = tiny_llama(gqa=True)
    save_tiny(model, workspace / "artifacts" / "model")
    blocks = torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    (workspace / "artifacts" / "calibration").mkdir()
    save_file(collect_channel_stats(model, blocks, batch_size=2, progress=False), workspace / "artifacts" / "calibration" / "stats.safetensors")
    heads_dir = workspace / "artifacts" / "tomoe" / "tomoe@0.5"
    heads_dir.mkdir(parents=True)
    heads = ToMoEHeads(Geometry.from_config(model.config), 4)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, heads_dir / "heads.safetensors")
    (heads_dir / "training.json").write_text(json.dumps({"v_topk": [8, 8]}))


def test_remove_checks_space_for_all_carved_models_before_writing(tmp_path, monkeypatch):
    from stages import remove

    write_corpus(tmp_path / "corpus.jsonl")
    carve_inputs(tmp_path)
    params = validate(params_for(tmp_path, str(tmp_path / "artifacts" / "model")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(remove, "stage_run", untracked)

    real_disk_usage = shutil.disk_usage
    fake_free_space(monkeypatch, free=100 << 20)  # enough for one tiny model and its headroom, not two
    with pytest.raises(InsufficientDiskSpaceError, match=r"the carved models \(tomoe@0\.5, static@0\.5\)"):
        remove.run(params)
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["calibration", "model", "tomoe"]
    assert not (tmp_path / "metrics").exists()

    # With room to spare the stage runs, and what it writes fits in what it asked for.
    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)
    needed = []
    monkeypatch.setattr(remove, "ensure_free_space", lambda directory, count, what: needed.append(count))
    remove.run(params)
    written = sum(f.stat().st_size for f in (tmp_path / "artifacts" / "remove").rglob("*") if f.is_file())
    assert needed and written <= needed[0]


# --- bad data ----------------------------------------------------------------------------------------


def build_general_domain(workspace: Path, block_size: int):
    from stages.prepare_data import build_domain

    raw = params_for(workspace, "some/hub-id")
    raw["data"]["block_size"] = block_size
    params = validate(raw)
    return build_domain("general", params.data.domains["general"], params, tiny_tokenizer(), workspace / "out")


def test_documents_shorter_than_a_block_are_joined_into_full_blocks(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", documents=20)
    summary = build_general_domain(tmp_path, block_size=64)  # every document is shorter than 64 tokens
    blocks = load_file(tmp_path / "out" / "train_blocks.safetensors")["blocks"]
    assert summary["train_blocks"] == len(blocks) > 0 and blocks.shape[1] == 64


def test_a_corpus_that_cannot_fill_one_block_is_an_error_with_the_numbers(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", documents=3)  # one of them is held out
    with pytest.raises(ValueError, match=r"data\.domains\.general: its 2 training document\(s\) hold \d+ tokens, fewer than one block of data\.block_size=512"):
        build_general_domain(tmp_path, block_size=512)
    assert not (tmp_path / "out").exists()


def test_an_empty_perplexity_corpus_is_named(tmp_path, monkeypatch):
    from stages.evaluate import corpus_tokens

    (tmp_path / "artifacts" / "data" / "general").mkdir(parents=True)
    (tmp_path / "artifacts" / "data" / "general" / "heldout.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'general/heldout' has no documents"):
        corpus_tokens(tiny_tokenizer(), "general/heldout")


# --- untrusted model files ----------------------------------------------------------------------------


def pickled_source(directory: Path) -> Path:
    """A tiny Llama whose only weights are a pickled pytorch_model.bin (as older hub repos ship them)."""
    model = tiny_llama()
    directory.mkdir()
    model.config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def test_pickled_weights_are_refused_without_the_flag(tmp_path, monkeypatch):
    source = pickled_source(tmp_path / "source")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not run without the flag"))
    with pytest.raises(PickledWeightsError, match=r"only pickled weights \(pytorch_model\.bin\).*model\.allow_pickle_weights: true"):
        materialize(str(source), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickled_weights_load_with_the_flag_and_come_out_as_safetensors(tmp_path):
    source = pickled_source(tmp_path / "source")
    out = materialize(str(source), tmp_path / "out", allow_pickle_weights=True)
    assert sorted(p.suffix for p in out.iterdir() if p.suffix in (".bin", ".pt", ".safetensors")) == [".safetensors"]
    loaded, _ = load_model(out)
    reference = torch.load(source / "pytorch_model.bin", weights_only=True)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, reference["model.layers.1.mlp.down_proj.weight"])


def test_allow_pickle_weights_is_a_boolean_that_defaults_to_off(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl")
    raw = params_for(tmp_path, "some/hub-id")
    assert validate(raw).model.allow_pickle_weights is False
    raw["model"]["allow_pickle_weights"] = "perhaps"
    with pytest.raises(ParamsError, match="model.allow_pickle_weights = 'perhaps'"):
        validate(raw)


def remote_code_source(directory: Path, model_type: str) -> Path:
    """A model directory whose configs point transformers at a .py file that leaves a marker if run."""
    save_tiny(tiny_llama(), directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    marker = directory.parent / "remote-code-ran"
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('remote code ran')\n")
    return directory


def test_auto_map_code_of_a_known_family_is_never_run(tmp_path):
    source = remote_code_source(tmp_path / "source", "llama")
    out = materialize(str(source), tmp_path / "out")
    assert not (tmp_path / "remote-code-ran").exists()
    loaded, _ = load_model(out)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    for name in ("config.json", "tokenizer_config.json"):  # the output names no code it does not hold
        assert "auto_map" not in json.loads((out / name).read_text())


def test_auto_map_of_an_unknown_family_is_refused_without_running_it(tmp_path):
    source = remote_code_source(tmp_path / "source", "evilnet")
    with pytest.raises(ValueError, match="model_type 'evilnet' is not supported.*llama"):
        materialize(str(source), tmp_path / "out")
    assert not (tmp_path / "remote-code-ran").exists()


def test_no_code_asks_transformers_to_trust_remote_code():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("src", "stages", "flows", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if "trust_remote_code=True" in path.read_text(encoding="utf-8").replace(" ", "")
    ]
    assert offenders == []


# --- a SIGKILLed training stage, and determinism ----------------------------------------------------


def test_fresh_tomoe_heads_depend_only_on_the_seed():
    from llmcarve.methods.tomoe.hypernetwork import ToMoEHeads
    from llmcarve.models.adapters import Geometry

    geometry = Geometry.from_config(tiny_llama().config)
    torch.manual_seed(1)
    first = ToMoEHeads(geometry, 4, seed=0).state_dict()
    after_first = torch.rand(1)
    torch.manual_seed(2)  # a different global RNG state, as in a new process
    second = ToMoEHeads(geometry, 4, seed=0).state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first), "building heads must not consume the caller's RNG"
    other = ToMoEHeads(geometry, 4, seed=1).state_dict()
    assert not torch.equal(first["mlp.0.router.weight"], other["mlp.0.router.weight"])


STEPS, CHECKPOINT_EVERY = 40, 5

# Several stages in one interpreter, each exactly as `python -m stages.<name>` runs it: importing
# torch, transformers and MLflow costs seconds per process, the tiny stages themselves far less.
RUN_STAGES = """
import runpy, sys
for module in sys.argv[1:]:
    sys.argv = [module]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_stages(work: Path, *modules: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", RUN_STAGES, *modules], cwd=work, env=offline_env(work), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def make_workspace(work: Path, model_source: str) -> Path:
    """The real stages/ and a tiny params.yaml; artifacts/ and metrics/ start empty."""
    work.mkdir()
    shutil.copytree(ROOT / "stages", work / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    write_corpus(work / "corpus.jsonl")
    raw = params_for(work, model_source)
    raw["tomoe"].update(steps=STEPS, checkpoint_every=CHECKPOINT_EVERY)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    return work


def checkpoint_file(work: Path) -> Path | None:
    found = list((work / "artifacts" / "checkpoints" / "tomoe").glob("tomoe@0.5-*/checkpoint.safetensors"))
    return found[0] if found else None


def kill_after_first_checkpoint(work: Path) -> int:
    """Start the tomoe stage, SIGKILL it once a checkpoint exists; return the checkpointed step."""
    log = (work / "killed-run.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "stages.tomoe"], cwd=work, env=offline_env(work), stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while checkpoint_file(work) is None:
        assert process.poll() is None, f"tomoe exited before its first checkpoint:\n{(work / 'killed-run.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    assert process.poll() is None, "tomoe finished before it could be killed; raise STEPS"
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    log.close()
    with safe_open(checkpoint_file(work), "pt") as handle:
        return int(handle.metadata()["step"])


def first_progress(result: subprocess.CompletedProcess) -> int:
    """The step the tomoe progress bar started at: tqdm's first line reads `tomoe: ... <step>/<STEPS> [`."""
    found = re.search(rf"tomoe:[^\r\n]*?(\d+)/{STEPS} \[", result.stderr)
    assert found, result.stderr[-2000:]
    return int(found[1])


def tomoe_outputs(work: Path) -> dict:
    directory = work / "artifacts" / "tomoe" / "tomoe@0.5"
    training = json.loads((directory / "training.json").read_text())
    metrics = json.loads((work / "metrics" / "tomoe.json").read_text())["tomoe@0.5"]
    return {
        "heads": load_file(directory / "heads.safetensors"),
        "v_topk": training["v_topk"],
        "final": metrics["final"],
        "steps": metrics["steps"],
        "tokens": metrics["tokens"],
    }


def assert_identical(first: dict, second: dict) -> None:
    assert first["heads"].keys() == second["heads"].keys()
    for name, tensor in first["heads"].items():
        assert torch.equal(tensor, second["heads"][name]), name
    assert {k: v for k, v in first.items() if k != "heads"} == {k: v for k, v in second.items() if k != "heads"}


@pytest.mark.slow
def test_sigkilled_tomoe_resumes_to_the_uninterrupted_result_and_reruns_are_identical(tmp_path):
    source = save_tiny(tiny_llama(gqa=True), tmp_path / "tiny-source")

    # Workspace A: tomoe is SIGKILLed mid-run, then started again.
    killed = make_workspace(tmp_path / "killed", source)
    run_stages(killed, "stages.prepare_model", "stages.prepare_data")
    step = kill_after_first_checkpoint(killed)
    assert 0 < step < STEPS and step % CHECKPOINT_EVERY == 0
    # No half-written output: at most a hidden staging directory that no stage reads.
    assert not (killed / "artifacts" / "tomoe").exists()
    assert not (killed / "metrics" / "tomoe.json").exists()
    assert all(p.name.startswith(".tomoe.tmp-") for p in (killed / "artifacts").iterdir() if "tomoe" in p.name)
    resumed = run_stages(killed, "stages.tomoe")
    assert first_progress(resumed) == step, "the rerun must start from the checkpoint, not from step 0"
    assert not list((killed / "artifacts").glob(".tomoe.tmp-*")), "the rerun removes the killed run's staging directory"

    # Workspace B: the same params, never interrupted.
    straight = make_workspace(tmp_path / "straight", source)
    run_stages(straight, "stages.prepare_model", "stages.prepare_data", "stages.tomoe")
    assert_identical(tomoe_outputs(killed), tomoe_outputs(straight))

    # Determinism: the same params and seed give the same metrics in both workspaces (wall time aside) ...
    for stage in ("prepare_model", "prepare_data"):
        first, second = (json.loads((work / "metrics" / f"{stage}.json").read_text()) for work in (killed, straight))
        first.pop("seconds", None), second.pop("seconds", None)
        assert first == second, stage
    blocks = [load_file(work / "artifacts" / "data" / "general" / "train_blocks.safetensors")["blocks"] for work in (killed, straight)]
    assert torch.equal(*blocks)

    # ... and training from scratch a second time in B gives the same heads and metrics again.
    first = tomoe_outputs(straight)
    for path in ("artifacts/tomoe", "artifacts/checkpoints", "metrics/tomoe.json"):
        shutil.rmtree(straight / path) if (straight / path).is_dir() else (straight / path).unlink()
    rerun = run_stages(straight, "stages.tomoe")
    assert first_progress(rerun) == 0
    assert_identical(first, tomoe_outputs(straight))


def test_atomic_directory_replaces_the_output_only_when_writing_succeeds(tmp_path):
    target = tmp_path / "artifacts" / "remove"
    orphan = tmp_path / "artifacts" / ".remove.tmp-99999"  # left by a run that was killed
    orphan.mkdir(parents=True)
    with atomic_directory(target) as staging:
        (staging / "model.safetensors").write_text("first")
    assert (target / "model.safetensors").read_text() == "first"
    assert not orphan.exists()
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "model.safetensors").write_text("half")
            raise RuntimeError("killed halfway")
    assert (target / "model.safetensors").read_text() == "first", "a failed write must leave the previous output"
    assert sorted(p.name for p in target.parent.iterdir()) == ["remove"]
