"""The keys the two apps agree on: a train task's ``ConfigRecord`` ("config"), and what a reply echoes back.

The server writes a task's config (the engine's own keys, the downlink compressor's, and the strategy's
``Task.config``); the ClientApp and a strategy's client half read it. Both sides name a key through these
constants, so a renamed key cannot silently leave one side reading nothing. Values are Flower config scalars
(``TaskConfig``). Run-config keys (``strategies/config.py``) are a different namespace, even where a name
coincides (``delay``, ``mixing``).
"""

from __future__ import annotations

from strategies.config import ConfigValue

TaskConfig = dict[str, ConfigValue]

# Every train task, from the engine: local training settings and the task's identity.
LR = "lr"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
MOMENTUM = "momentum"
PROX_MU = "prox-mu"
TASK_SEQ = "task-seq"            # the engine's sequence number of the task
MODEL_VERSION = "model-version"  # the model version the task trains from
TASK_SEED = "task-seed"          # seeds the node's batches and the upload codec

# Two-way compression of the broadcast model (server_app/downlink.py; strategies.client.downlink_model).
DOWNLINK = "downlink"            # DOWNLINK_FULL or DOWNLINK_DELTA
DOWNLINK_FULL = "full"           # the message carries the model
DOWNLINK_DELTA = "delta"         # it carries a compressed difference against the node's copy of BASE_VERSION
BASE_VERSION = "base-version"

# From strategies (``Task.config``).
SERVER_ROUND = "server-round"    # FedAvg's round, 1-based: the name Flower's own strategies use
ROUND = "round"                  # period (OLCO3 family) or gossip round (D-PSGD, AllReduce-SGD)
DELAY = "delay"                  # OLCO3 family: D, the periods a node may run ahead
PAYLOAD = "payload"              # OLCO3 family: what the message carries ("model", "average", "none", ...)
MIXING = "mixing"                # OLCO3 family: the pull strength of Overlap-Local-SGD
PEER = "peer"                    # AD-PSGD: the neighbour (topology index) an active node averages with

# A training reply's metrics.
NUM_EXAMPLES = "num-examples"    # examples the node trained on (FedAvg weights by it)
COMPUTE_S = "compute-s"          # seconds the node computed (the wall clock's compute time of the task)
TRAIN_LOSS = "train-loss"        # mean training loss of the task's local steps
ECHO = (TASK_SEQ, MODEL_VERSION)  # what our ClientApp echoes from its task's config, so a stray reply is caught
