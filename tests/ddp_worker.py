"""Run by tests under `torchrun`: train a few steps through scm.train.train and save this rank's weights.

usage: ddp_worker.py OUT_FILE PRESET DATA RUN_DIR [key=value ...]
"""

import os
import sys

from safetensors.torch import save_file

from scm.config import make_config
from scm.train import train
from scm.train.distributed import full_model_state, shutdown

out_file, preset, data, run_dir, *overrides = sys.argv[1:]
cfg = make_config(preset, None, overrides, data=data, out=run_dir)
result = train(cfg)
rank = int(os.environ.get("RANK", "0"))
# FSDP2: gather the sharded weights (rank 0 receives them); DDP: each rank's own replica
state = full_model_state(result.net) if cfg.distributed == "fsdp" else result.net.state_dict()
if state:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out_file.replace("RANK", str(rank)))
shutdown()
