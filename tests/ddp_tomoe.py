"""ToMoE training of a tiny GQA Llama on this process's share of every batch; launched by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_tomoe.py OUT_DIR

Rank 0 writes the trained heads, the V width caps and the loss log to OUT_DIR (test_tomoe_distributed.py).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llmcarve.methods.tomoe.distributed import Shard  # noqa: E402
from llmcarve.methods.tomoe.trainer import train_tomoe  # noqa: E402
from tests.test_tomoe_distributed import BLOCKS, CONFIG, model  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    shard = Shard.current()
    result = train_tomoe(model(), BLOCKS, CONFIG, out / "checkpoints", shard=shard)
    if shard.rank == 0:
        save_file({k: v.contiguous() for k, v in result.heads.state_dict().items()}, out / "heads.safetensors")
        (out / "log.json").write_text(json.dumps({"v_topk": result.v_topk, "history": result.history}))
    dist.destroy_process_group()
