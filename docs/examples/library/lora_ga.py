# docs/examples/library/lora_ga.py
"""LoRA-GA on a PEFT model: adapters from PEFT, their initialisation from the gradient of
the frozen weights, estimated on a few batches of every rank and averaged over the ranks."""
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from thinwire import WireMeter
from thinwire.optim import lora_ga_init
from example_data import batch, make_model


def build(ga_batches: int = 4):
    model = get_peft_model(make_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    meter = WireMeter()
    batches = [batch(-(i + 1)) for i in range(ga_batches)]  # this rank's estimation batches
    lora_ga_init(model, batches, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), meter=meter)
    return model, meter.total()  # the estimate's all-reduces are setup traffic
