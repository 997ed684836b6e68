"""Run by tests under `torchrun`: train a few steps through scm.train.train and save this rank's weights.

usage: ddp_worker.py OUT_FILE PRESET DATA RUN_DIR [key=value ...]

It then checks that `shutdown` frees the process groups (a group left for interpreter exit can abort a
finished run there): exit status 5 otherwise.
"""

import os
import sys
import weakref

from safetensors.torch import save_file
from torch.distributed.distributed_c10d import _world

from scm.config import make_config
from scm.train import train
from scm.train.distributed import full_model_state, shutdown


def main(out_file: str, preset: str, data: str, run_dir: str, *overrides: str) -> list[weakref.ref]:
    cfg = make_config(preset, None, list(overrides), data=data, out=run_dir)
    net = train(cfg).net
    rank = int(os.environ.get("RANK", "0"))
    # FSDP2: gather the sharded weights (rank 0 receives them); DDP: each rank's own replica
    state = full_model_state(net) if cfg.distributed == "fsdp" else net.state_dict()
    if state:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out_file.replace("RANK", str(rank)))
    return [weakref.ref(group) for group in _world.pg_map]


if __name__ == "__main__":
    groups = main(*sys.argv[1:])  # the model is gone when main returns, before shutdown
    shutdown()
    alive = sum(group() is not None for group in groups)
    if not groups or alive:
        sys.exit(f"{alive} of {len(groups)} process groups outlived shutdown()")
