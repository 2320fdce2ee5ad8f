"""The training plumbing shared by every trainer: checkpoints, exact resume, the config check, the NaN stop.

A toy trainer (a linear model, the way a trainer uses the module) stands in for ToMoE, ATP and recovery,
so these tests run in a fraction of a second; test_tomoe.py and test_atp.py check the real trainers' wiring.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from llmcarve.methods import training
from llmcarve.methods.training import (
    CHECKPOINT,
    CheckpointMismatchError,
    NonFiniteLossError,
    batch_for_step,
    check_finite,
    checkpoint_due,
    load_checkpoint,
    noise_generator,
    restore_optimizer,
    run_fingerprint,
    save_checkpoint,
)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    steps: int = 8
    batch_size: int = 3
    lr: float = 0.05
    checkpoint_every: int = 3
    seed: int = 0


INPUTS = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
TARGETS = INPUTS @ torch.tensor([1.0, -2.0, 0.5, 3.0])


def toy_train(
    directory: Path, config: ToyConfig, targets: torch.Tensor = TARGETS, stop_after: int | None = None, nan_at: int | None = None
):
    """A trainer as the module expects one: seeded batches and noise, checked parts, checkpoints, resume.

    `nan_at` turns the loss of that step into NaN (a numerical fault the data does not show).
    """
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():  # initialisation from the seed alone, not from the global RNG
        model.weight.copy_(torch.randn(1, 4, generator=torch.Generator().manual_seed(config.seed)))
        model.bias.zero_()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    fingerprint = run_fingerprint(config, INPUTS, targets)
    history: list[dict] = []
    start = 0
    checkpoint = load_checkpoint(directory, fingerprint)
    if checkpoint is not None:
        model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint.tensors.items()})
        restore_optimizer(optimizer, checkpoint.optimizer("model"))
        start, history = checkpoint.step, checkpoint.metadata["history"]
    for step in range(start, config.steps):
        rows = batch_for_step(len(INPUTS), config.batch_size, step, config.seed)
        noise = 0.01 * torch.randn(config.batch_size, 4, generator=noise_generator(torch.device("cpu"), config.seed, step))
        loss = torch.nn.functional.mse_loss(model(INPUTS[rows] + noise).squeeze(-1), targets[rows])
        if step == nan_at:
            loss = loss * float("nan")
        check_finite({"mse": loss}, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "mse": loss.item()})
        done = step + 1
        if checkpoint_due(done, config.checkpoint_every, config.steps):
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            save_checkpoint(directory, done, tensors, {"model": optimizer.state_dict()}, {"history": history}, fingerprint)
        if stop_after is not None and done - start >= stop_after:
            break
    return model.state_dict(), history


def adam_after_one_step() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(INPUTS).square().mean().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_round_trip_returns_every_tensor_state_and_value(tmp_path):
    model, optimizer = adam_after_one_step()
    tensors = {"ints": torch.arange(6).reshape(2, 3), "half": torch.randn(3).bfloat16(), **model.state_dict()}
    metadata = {"history": [{"step": 0, "loss": 0.1}], "freeze": {"ratio": 0.5}, "widths": [[1, 2], [3]]}
    save_checkpoint(tmp_path, 7, tensors, {"opt": optimizer.state_dict()}, metadata, "abc")
    loaded = load_checkpoint(tmp_path, "abc")
    assert loaded.step == 7 and loaded.path == tmp_path / CHECKPOINT
    assert loaded.tensors.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded.tensors[name].dtype == value.dtype and torch.equal(loaded.tensors[name], value), name
    assert loaded.metadata == metadata
    saved_state = optimizer.state_dict()["state"]
    assert loaded.optimizer("opt")["state"].keys() == saved_state.keys()
    for index, state in saved_state.items():
        for name, value in state.items():
            assert torch.equal(loaded.optimizer("opt")["state"][index][name], value), (index, name)
    with pytest.raises(KeyError, match="no state for an optimizer 'other'"):
        loaded.optimizer("other")


def test_restored_optimizer_takes_the_same_next_step(tmp_path):
    model, optimizer = adam_after_one_step()
    save_checkpoint(tmp_path, 1, model.state_dict(), {"opt": optimizer.state_dict()}, {}, "abc")
    twin = torch.nn.Linear(4, 2)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    loaded = load_checkpoint(tmp_path, "abc")
    twin.load_state_dict(loaded.tensors)
    restore_optimizer(twin_optimizer, loaded.optimizer("opt"))
    for module, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        module(INPUTS).square().mean().backward()
        opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[name]), name


def test_killed_toy_run_resumes_to_the_uninterrupted_run_bit_for_bit(tmp_path, caplog):
    config = ToyConfig()
    straight, straight_history = toy_train(tmp_path / "straight", config)
    toy_train(tmp_path / "resumed", config, stop_after=4)  # "killed" at step 4: the checkpoint holds step 3
    with caplog.at_level(logging.INFO, logger=training.__name__):
        resumed, resumed_history = toy_train(tmp_path / "resumed", config)
    assert resumed_history == straight_history
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    resumes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from checkpoint")]
    assert resumes == [f"resumed from checkpoint {tmp_path / 'resumed' / CHECKPOINT} at step 3"]


def test_a_checkpoint_of_another_config_or_data_is_refused(tmp_path):
    toy_train(tmp_path, ToyConfig(), stop_after=3)
    saved = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(CheckpointMismatchError, match=f"another run .* delete {tmp_path}"):
        toy_train(tmp_path, ToyConfig(lr=0.1))
    with pytest.raises(CheckpointMismatchError, match="another run"):
        toy_train(tmp_path, ToyConfig(), targets=TARGETS + 1)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved  # refused, not overwritten
    toy_train(tmp_path, ToyConfig())  # its own config still resumes


def test_fingerprint_follows_the_config_and_the_data():
    base = run_fingerprint(ToyConfig(), INPUTS)
    assert run_fingerprint(ToyConfig(), INPUTS.clone()) == base
    assert run_fingerprint(ToyConfig(seed=1), INPUTS) != base
    assert run_fingerprint(ToyConfig(), INPUTS.reshape(4, 10)) != base  # same bytes, other blocks


def test_checkpoints_of_an_older_format_are_refused_with_what_to_do(tmp_path):
    from safetensors.torch import save_file

    save_file({"heads.w": torch.zeros(2)}, tmp_path / CHECKPOINT, metadata={"step": "4"})
    with pytest.raises(CheckpointMismatchError, match=f"earlier llmcarve.*delete {tmp_path}"):
        load_checkpoint(tmp_path, "abc")


def test_a_checkpoint_without_a_config_hash_is_a_warm_start_for_any_run(tmp_path, caplog):
    save_checkpoint(tmp_path, 0, {"w": torch.ones(2)}, {}, {}, config_hash=None)
    with caplog.at_level(logging.WARNING, logger=training.__name__):
        assert torch.equal(load_checkpoint(tmp_path, "abc").tensors["w"], torch.ones(2))
    assert "records no config hash" in caplog.text


def test_nan_stops_the_run_naming_part_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = ToyConfig()  # checkpoints after steps 3 and 6
    straight, _ = toy_train(tmp_path / "straight", config)
    toy_train(tmp_path, config, stop_after=3)
    saved = (tmp_path / CHECKPOINT).read_bytes()
    # the NaN comes in the step whose end would checkpoint
    with pytest.raises(NonFiniteLossError, match="'mse' is nan at step 5; training stopped, the last good checkpoint is kept"):
        toy_train(tmp_path, config, nan_at=5)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved
    resumed, _ = toy_train(tmp_path, config)  # the fault gone, the run resumes to the uninterrupted result
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_check_finite_says_what_is_wrong_and_what_to_do():
    check_finite({"a": 1.0, "b": torch.tensor(2.0), "c": torch.ones(3)}, 0)
    with pytest.raises(NonFiniteLossError, match=r"'b' is inf at step 5; .*\(lower the learning rate"):
        check_finite({"a": 1.0, "b": float("inf")}, 5)
    with pytest.raises(NonFiniteLossError, match=r"'v' is not finite in 1 of 3 elements at step 2; .*\(check the tokens\)"):
        check_finite({"v": torch.tensor([1.0, float("nan"), 2.0])}, 2, advice="check the tokens")


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, {}, {}, "abc")
    saved = (tmp_path / CHECKPOINT).read_bytes()

    def killed_mid_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt  # what a kill looks like from inside

    monkeypatch.setattr(training, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 6, {"w": torch.zeros(2)}, {}, {}, "abc")
    assert (tmp_path / CHECKPOINT).read_bytes() == saved
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, "abc").step == 3


def test_reserved_names_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 1, {}, {}, {"step": 2}, "abc")
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 1, {"optimizer.x": torch.zeros(1)}, {}, {}, "abc")
    with pytest.raises(ValueError, match="plain word"):
        save_checkpoint(tmp_path, 1, {}, {"a.b": {"state": {}}}, {}, "abc")
    assert not (tmp_path / CHECKPOINT).exists()


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch():
    first_epoch = torch.cat([batch_for_step(10, 2, step, seed=3) for step in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(10))  # every block once per epoch
    assert torch.equal(batch_for_step(10, 2, 4, seed=3), batch_for_step(10, 2, 4, seed=3))
    assert not torch.equal(first_epoch, torch.cat([batch_for_step(10, 2, step, seed=4) for step in range(5)]))
    cpu = torch.device("cpu")
    assert torch.equal(torch.rand(3, generator=noise_generator(cpu, 1, 2)), torch.rand(3, generator=noise_generator(cpu, 1, 2)))


def test_checkpoints_are_due_every_n_steps_and_after_the_last():
    assert [done for done in range(1, 9) if checkpoint_due(done, 3, 8)] == [3, 6, 8]
