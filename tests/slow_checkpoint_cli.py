"""The `scm` command with every checkpoint file's write followed by a pause of SLOW_SECONDS (a test kills the
process while a checkpoint is being written). Usage: python slow_checkpoint_cli.py SLOW_SECONDS train ..."""

import sys
import time

import scm.runs
from scm.app.cli import main

pause = float(sys.argv.pop(1))
write = scm.runs.save_tensors


def slow_save_tensors(tensors, path, **kwargs):
    write(tensors, path, **kwargs)
    time.sleep(pause)


scm.runs.save_tensors = slow_save_tensors
main()
