# docs/examples/library/lightning_fit.py
"""PyTorch Lightning: the ``ThinwireCommHook`` callback registers thinwire's hook on the
DDP model (on CPU too, where ``DDPStrategy(ddp_comm_hook=...)`` would silently not) and
checks that it ran."""
import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from thinwire.integrations.lightning import ThinwireCommHook
from example_data import make_model


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(hook: ThinwireCommHook | None, devices: int = 2, steps: int = 8, strategy="ddp") -> Classifier:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16 * devices * steps, 32, generator=g)
    data = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=16)
    model = Classifier()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                        callbacks=[hook] if hook else [], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return model  # the bytes: hook.meter.total()
