"""A real Lightning run whose ModelCheckpoint writes .ckpt files every few steps."""

import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

out, steps = sys.argv[1], int(sys.argv[2])


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, _):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.01)


torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randn(256, 1))
ckpt = ModelCheckpoint(dirpath=out, every_n_train_steps=5, save_top_k=-1, filename="{epoch}-{step}")
trainer = L.Trainer(
    max_steps=steps,
    callbacks=[ckpt],
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
)
trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
print("DONE", flush=True)
