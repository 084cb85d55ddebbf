# docs/examples/library/plain_loop.py
"""A torchtitan-style script: torchrun starts it, it builds everything itself, one
``train_step`` per step, bytes logged per step. Run: ``torchrun --nproc-per-node 2 plain_loop.py``."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from thinwire import WireMeter, allreduce_bytes, comm_hook
from example_data import batch, make_model


def main(steps: int = 6) -> list[dict]:
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    model = make_model().to(device)
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meter = WireMeter()
    state, hook = comm_hook("int8", feedback="ef", collective="allgather", model=model, optimizer=opt, meter=meter)
    ddp.register_comm_hook(state, hook)
    numel, world = sum(p.numel() for p in model.parameters()), dist.get_world_size()
    log = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        sent = meter.take()  # this step's bytes, typed
        log.append({"step": step, "loss": loss.item(), **sent.as_dict("comm/"),
                    "comm/ratio_to_bf16": sent.wire / allreduce_bytes(numel, world, torch.bfloat16)})
    return log


if __name__ == "__main__":
    for row in main():
        if dist.get_rank() == 0:
            print(row)
    dist.destroy_process_group()
