# docs/examples/library/fsdp2_outer_loop.py
"""FSDP2 inside each island, DiLoCo across islands, in a torchtitan-style loop: a 2-D
DeviceMesh (replicate x shard), ``fully_shard`` on every block and then on the root over the
mesh's shard dimension (nothing is all-reduced across islands per step), and
``OuterLoop(mesh=mesh)``, which averages this rank's local shards over the replicate
dimension every ``local_steps`` steps."""
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from thinwire import OuterLoop
from example_data import batch

DILOCO = {"_target_": "torch.optim.SGD", "lr": 0.7, "momentum": 0.9, "nesterov": True}  # the outer step


class ResidualMLP(torch.nn.Module):
    """A stack of blocks, as a transformer is: FSDP2 wraps each block, then the root."""

    def __init__(self, width: int = 64, depth: int = 2):
        super().__init__()
        self.embed = torch.nn.Linear(32, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU()) for _ in range(depth))
        self.head = torch.nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def make_residual_mlp() -> ResidualMLP:
    torch.manual_seed(0)  # the same initial parameters on every rank
    return ResidualMLP()


def train(steps: int, replicas: int, shards: int, device: str = "cpu", comm="none", **options):
    """``replicas`` x ``shards`` ranks (the world size): islands of ``shards`` consecutive ranks."""
    mesh = init_device_mesh(device, (replicas, shards), mesh_dim_names=("replicate", "shard"))
    model = make_residual_mlp().to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])  # the root: embed and head
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # on this rank's shards
    with OuterLoop(model, "local", comm=comm, mesh=mesh, outer_optim=DILOCO, **options) as outer:
        for step in range(steps):
            x, y = batch(step)
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()  # reduce-scattered in the island
            opt.step()
            outer.step()  # every local_steps: the outer step across islands, on local shards
        with outer.eval_model() as averaged:  # the replicas' mean (every rank gathers it)
            x, y = batch(10_000)
            val = float(F.cross_entropy(averaged(x.to(device)), y.to(device)))
    return model, val, outer.meter.total()
