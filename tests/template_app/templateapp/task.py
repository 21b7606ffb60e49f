"""templateapp: the user's own model, data and training, on *flattened* 8x8 digits.

``EPOCHS_SEEN`` records the ``epochs`` each ``train`` call was given, so a test can tell that the run-config key
``local-epochs`` reached the ClientApp (in-process runs share this module).
"""

import functools

import torch
from flwr.app import ArrayRecord, MetricRecord
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EPOCHS_SEEN: list[int] = []


class Net(nn.Module):
    """A small MLP on 64 features: it does not accept images of shape (1, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@functools.cache
def _digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def load_data(partition_id: int, num_partitions: int):
    """This node's slice of the first 80% of digits, split 80/20 into train and validation loaders."""
    x, y = _digits()
    cut = int(0.8 * len(y))
    x, y = x[:cut][partition_id::num_partitions], y[:cut][partition_id::num_partitions]
    split = int(0.8 * len(y))
    train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=32)
    return train, val


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    EPOCHS_SEEN.append(epochs)
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (outputs.argmax(1) == labels.to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Flower's server-side evaluate_fn: the held-out last 20% of digits."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    x, y = _digits()
    cut = int(0.8 * len(y))
    loss, acc = test(model, DataLoader(TensorDataset(x[cut:], y[cut:]), batch_size=128), torch.device("cpu"))
    return MetricRecord({"accuracy": acc, "loss": loss})
