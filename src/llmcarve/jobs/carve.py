"""`llmcarve carve`: one model source carved by one method at one budget into a named directory.

The same pieces as the pipeline's stages (calibrate + remove for static, tomoe + remove, atp + remove),
chained in one process: the corpus is packed as prepare_data packs a domain, so a carve on a builtin
domain with the pipeline's settings trains on the pipeline's blocks.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcarve.calibration import collect_channel_stats
from llmcarve.data.domains import Corpus, training_blocks
from llmcarve.data.packing import tokenize_documents
from llmcarve.jobs.atp import atp_model, split_generator_blocks, trained_lora
from llmcarve.jobs.calibrate import select_calibration_blocks
from llmcarve.jobs.models import prepared_model_dir, write_model
from llmcarve.jobs.tomoe import check_num_experts, heads_from_state, tomoe_model
from llmcarve.jobs.training import frozen_model_dtype, run_hash
from llmcarve.methods.atp.config import ATPConfig
from llmcarve.methods.atp.generator import masks_state
from llmcarve.methods.atp.trainer import train_atp
from llmcarve.methods.baselines.static import prune_static
from llmcarve.methods.tomoe.config import ToMoEConfig
from llmcarve.methods.tomoe.trainer import train_tomoe
from llmcarve.models.adapters import Geometry
from llmcarve.models.loading import load_model
from llmcarve.names import ModelName

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CarveJob:
    """What every carve needs besides its method's settings."""

    source: str  # what params.yaml's model.source accepts
    out: Path
    corpus: Corpus
    device: torch.device
    seed: int = 0
    block_size: int = 512
    allow_pickle_weights: bool = False
    checkpoints: Path | None = None  # None: a temporary directory, so a killed run starts over

    def blocks(self, tokenizer, seq_len: int | None = None) -> torch.Tensor:
        """The corpus packed as the pipeline packs a domain (blocks of block_size), each cut to seq_len."""
        token_lists = tokenize_documents(tokenizer, self.corpus.train)
        blocks = training_blocks(token_lists, tokenizer.eos_token_id, self.block_size, f"--domain {self.corpus.domain}", "--block-size")
        return blocks if seq_len is None else blocks[:, :seq_len]

    @contextmanager
    def checkpoint_root(self) -> Iterator[Path]:
        if self.checkpoints is not None:
            yield self.checkpoints
            return
        with tempfile.TemporaryDirectory(prefix="llmcarve-checkpoints-") as scratch:
            yield Path(scratch)


def carve_static(job: CarveJob, p: float, num_blocks: int, batch_size: int) -> ModelName:
    """Channel statistics of the dense model on `num_blocks` seeded blocks, static pruning to p, saved."""
    name = ModelName("static", budget=p)
    with prepared_model_dir(job.source, job.allow_pickle_weights) as directory:
        model, tokenizer = load_model(directory, "float32", str(job.device))
        blocks = select_calibration_blocks(job.blocks(tokenizer), num_blocks, job.seed, "--calibration-blocks")
        log.info("calibrating on %d blocks of %d tokens of '%s'", len(blocks), blocks.shape[1], job.corpus.domain)
        stats = collect_channel_stats(model, blocks, batch_size=batch_size)
        write_model(prune_static(model.to("cpu"), stats, p), tokenizer, job.out, name)
    return name


def carve_tomoe(job: CarveJob, config: ToMoEConfig, seq_len: int, name_tolerance: float) -> ModelName:
    """ToMoE's heads trained against the frozen model, converted into the MoE model, saved if it measures
    within `name_tolerance` of its budget (which training learns rather than cuts)."""
    name = ModelName("tomoe", budget=config.p)
    with prepared_model_dir(job.source, job.allow_pickle_weights) as directory, job.checkpoint_root() as checkpoints:
        model, tokenizer = load_model(directory, frozen_model_dtype(job.device), str(job.device))
        geometry = Geometry.from_config(model.config)
        check_num_experts(config.num_experts, geometry, "--num-experts")
        blocks = job.blocks(tokenizer, seq_len)
        log.info("training ToMoE heads on %d blocks of %d tokens of '%s'", len(blocks), seq_len, job.corpus.domain)
        result = train_tomoe(model, blocks, config, checkpoints / f"{name}-{run_hash(config, blocks)}")
        # converted as the remove stage converts: from the float32 model on the CPU
        dense = model if model.dtype == torch.float32 and job.device.type == "cpu" else load_model(directory)[0]
        heads = heads_from_state(result.heads.state_dict(), geometry, config.num_experts)
        write_model(tomoe_model(dense, heads, config.offset, result.v_topk), tokenizer, job.out, name, name_tolerance)
    return name


def carve_atp(job: CarveJob, config: ATPConfig, seq_len: int, calibration_blocks: int) -> ModelName:
    """LoRA tuned on the corpus jointly with the pruning decisions, merged and sliced, saved."""
    name = ModelName("atp", domain=job.corpus.domain, budget=config.p)
    with prepared_model_dir(job.source, job.allow_pickle_weights) as directory, job.checkpoint_root() as checkpoints:
        model, tokenizer = load_model(directory, "float32", str(job.device))  # LoRA trains in fp32, as in the atp stage
        blocks = job.blocks(tokenizer, seq_len)
        lora_blocks, generator_blocks = split_generator_blocks(blocks, calibration_blocks, job.corpus.domain, "--calibration-blocks")
        log.info("tuning LoRA on %d blocks and the decisions on %d of '%s'", len(lora_blocks), len(generator_blocks), job.corpus.domain)
        result = train_atp(model, lora_blocks, generator_blocks, config, checkpoints / f"{name}-{run_hash(config, lora_blocks, generator_blocks)}")
        # merged into a fresh float32 copy on the CPU, as the remove stage does: merging consumes the model
        compact, removal = atp_model(load_model(directory)[0], trained_lora(result), masks_state(result.masks), config.lora, job.seed)
        log.info("removal changed the masked model's logits by at most %.2e", removal["max_abs_logit_diff"])
        write_model(compact, tokenizer, job.out, name)
    return name
