"""Training: the LightningModule, callbacks, the ``python -m fromage.train`` entry and its report."""
