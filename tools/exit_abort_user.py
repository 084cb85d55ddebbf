"""The user's script of issue 36, as docs/library.md shows it: DDP with thinwire's Top-K (5%)
error-feedback comm hook, 30 AdamW steps, ``dist.destroy_process_group()``, a normal return.
No thinwire call beyond ``comm_hook``. Run: ``torchrun --nproc-per-node 2 tools/exit_abort_user.py``
(tools/exit_abort_drill.py launches it many times and counts aborts)."""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import thinwire


def main(steps: int = 30) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state, hook = thinwire.comm_hook("topk", ratio=0.05, feedback="ef", min_numel=1024, model=model,
                                     optimizer=opt)
    ddp.register_comm_hook(state, hook)
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        x = torch.randn(16, 32, generator=g)
        opt.zero_grad()
        F.cross_entropy(ddp(x), x[:, :4].argmax(1)).backward()
        opt.step()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
