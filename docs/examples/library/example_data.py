# docs/examples/library/example_data.py
"""The model and data of the examples: a small classifier, a batch per (step, rank)."""
import torch
import torch.distributed as dist


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial parameters on every rank
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))


def batch(step: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of ``step``: 32 features, the label is the argmax of the first 4."""
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    x = torch.randn(size, 32, generator=g)
    return x, x[:, :4].argmax(1)
