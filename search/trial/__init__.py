"""One trial: the objective, the LightningModule, the training loop and its callbacks."""
