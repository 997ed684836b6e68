"""Run by tests under `torchrun`: train a few steps through scm.train.train and save this rank's weights.

usage: [SCM_WORKER_RESUME=1] ddp_worker.py OUT_FILE PRESET DATA RUN_DIR [key=value ...]

With SCM_WORKER_RESUME=1 it continues the run in RUN_DIR from its last checkpoint (`scm train --resume`).

It then checks that `shutdown` frees the process groups (a group left for interpreter exit can abort a
finished run there) and exits non-zero otherwise. Under FSDP2 on torch 2.11 and 2.12 nothing in Python can free them:
references that only torch's C++ side holds keep a tuple of DTensor specs, and through it the device mesh and its
group, after every Python cache is emptied (measured on 2.11.0 and 2.12.0; 2.13 frees them), so there the check
only reports.
"""

import os
import sys
import weakref

import torch
from safetensors.torch import save_file
from torch.distributed.distributed_c10d import _world

from scm.config import make_config
from scm.train import train
from scm.train.distributed import full_model_state, shutdown


def main(out_file: str, preset: str, data: str, run_dir: str, *overrides: str) -> list[weakref.ref]:
    cfg = make_config(preset, None, list(overrides), data=data, out=run_dir)
    net = train(cfg, resume=os.environ.get("SCM_WORKER_RESUME") == "1").net
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
    held_by_torch = "distributed=fsdp" in sys.argv and torch.__version__ < "2.13"  # a TorchVersion
    if not groups or (alive and not held_by_torch):
        sys.exit(f"{alive} of {len(groups)} process groups outlived shutdown()")
    if alive:
        print(f"{alive} of {len(groups)} process groups outlived shutdown() (torch {torch.__version__})",
              file=sys.stderr)
