"""The Flower ClientApp and what only a client needs: models, datasets, partitioning, local training."""
