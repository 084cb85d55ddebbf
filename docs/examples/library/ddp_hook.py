# docs/examples/library/ddp_hook.py
"""A plain DDP loop with thinwire's comm hook: Top-K (5%) with error feedback, a cosine
learning-rate schedule that the hook follows by itself, per-rank checkpoints."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from thinwire import WireMeter, comm_hook
from example_data import batch, make_model


def train(total_steps: int, ckpt_dir: str, start: int = 0, stop: int | None = None):
    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    meter = WireMeter()
    # optimizer=opt: the error-feedback residual is rescaled by lr_{t-1} / lr_t each step
    state, hook = comm_hook("topk", ratio=0.05, feedback="ef", min_numel=1024, model=model,
                            optimizer=opt, meter=meter)
    ddp.register_comm_hook(state, hook)

    path = os.path.join(ckpt_dir, f"rank{dist.get_rank()}.pt")  # per rank: EF buffers differ
    if start > 0:
        ck = torch.load(path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        state.load_state_dict(ck["comm"])  # refused if the comm config or the rank differs

    for step in range(start, stop or total_steps):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()  # the hook reads this step's lr from opt
        opt.step()
        sched.step()  # after opt.step(), as torch's schedulers expect

    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "comm": state.state_dict()}, path)
    return model, state, meter.total()
