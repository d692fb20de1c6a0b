"""ClientApp: train the global model on this node's data and upload the encoded update.

Deployment starts a fresh ClientApp process for every message, and four of the five
secure-aggregation stages only do cryptography: this module stays free of torch,
transformers and Opacus, and the train and evaluate handlers import
``client.training_round`` (which needs them) when they run.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.secure_aggregation import register_secure_aggregation

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client import training_round

    return training_round.train(msg, context)


register_secure_aggregation(app, train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client import training_round

    return training_round.evaluate(msg, context)
