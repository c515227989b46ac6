"""ProxSparse on the tests' tiny model, in one process or under torchrun; rank 0 saves the masks.

    python tests/scripts/learn_tiny.py OUT.pt RUN_DIR [--resume] [--kill-rank R --kill-step S]

``--kill-rank``/``--kill-step``: that rank kills itself (SIGKILL) at the start of that step,
as a crashed or killed process would.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
torch.set_num_threads(1)

from proxsparse import ProxSparseConfig, prune  # noqa: E402
from proxsparse.data import calibration_windows  # noqa: E402
from proxsparse.methods import proxsparse as method  # noqa: E402
from tests.conftest import make_model, make_tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("run_dir")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--kill-rank", type=int, default=-1)
parser.add_argument("--kill-step", type=int, default=-1)
args = parser.parse_args()
rank = int(os.environ.get("RANK", "0"))

if rank == args.kill_rank:
    real_step = method.ProxSparseLearning.step

    def step_or_die(self, step, batches):
        if step == args.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, step, batches)

    method.ProxSparseLearning.step = step_or_die

state_bytes = {}
real_finish = method.ProxSparseLearning.finish


def finish_and_count(self):
    """The bytes of this rank's learning state: its weights, gradients (as big as the
    trainable weights) and AdamW states."""
    from proxsparse.learning.distributed import local

    weights = sum(local(p).numel() * local(p).element_size() for p in self.trainable)
    states = sum(local(v).numel() * local(v).element_size()
                 for s in self.optimizer.state.values() for v in s.values() if v.dim())
    state_bytes["state"] = 2 * weights + states
    return real_finish(self)


method.ProxSparseLearning.finish = finish_and_count

tokenizer = make_tokenizer()
calib = calibration_windows(tokenizer, "builtin", num_windows=8, seqlen=32, seed=0)
model = make_model(len(tokenizer))
config = ProxSparseConfig(steps=6, lr=1e-3, batch_size=2, micro_batch_size=1, seed=3,
                          checkpoint_every=2, run_dir=args.run_dir, resume=args.resume)
result = prune(model, config, calib, progress=False)
torch.save({"masks": result.masks, "weights": model.state_dict(), **state_bytes},
           f"{args.out}.rank{rank}")
