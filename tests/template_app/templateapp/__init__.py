"""templateapp: a Flower / PyTorch app in the shape of `flwr new`'s template."""
