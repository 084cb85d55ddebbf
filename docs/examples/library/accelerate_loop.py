# docs/examples/library/accelerate_loop.py
"""Hugging Face Accelerate: register the hook on the model that ``prepare`` returns (the DDP
wrapper when there are several processes), with the unwrapped model for parameter names and
the prepared optimizer for the learning rate."""
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel as DDP

from thinwire import WireMeter, comm_hook
from example_data import batch, make_model


def train(steps: int, name: str = "topk", **comm):
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    model, opt = accelerator.prepare(model, opt)
    # a scheduler passed to prepare() steps once per process at each call: build it on the
    # prepared optimizer instead, so that it steps once per global step
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    meter = WireMeter()
    assert isinstance(model, DDP), "run it on several processes (accelerate launch)"
    state, hook = comm_hook(name, model=accelerator.unwrap_model(model), optimizer=opt, meter=meter, **comm)
    model.register_comm_hook(state, hook)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        accelerator.backward(F.cross_entropy(model(x), y))
        opt.step()
        sched.step()
    return accelerator.unwrap_model(model), meter.total()
