"""Sepal's ClientApp, holding one SuperNode's train replies past the round timeout.

The deployment test runs this ClientApp on every SuperNode and sets ``HOLD_REPLY_S``
and ``HOLD_ROUND`` in the environment of one SuperNode only: Flower's SuperNode
starts its SuperExec, and the SuperExec each ClientApp process, with
``subprocess.Popen`` and no ``env``, so that SuperNode's ClientApps inherit them. The
hold counts from the instruction's creation, not from the ClientApp's start, so the
reply's lateness does not depend on how long a fresh process takes to start.
"""

from __future__ import annotations

import os
import time

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from client.app import app as sepal_app
from sepal import wire

HOLD_REPLY_S = "SEPAL_TEST_HOLD_REPLY_S"  # hold until this long after the instruction
HOLD_ROUND = "SEPAL_TEST_HOLD_ROUND"      # in this round only


class HeldClientApp(ClientApp):
    def __call__(self, message: Message, context: Context) -> Message:
        hold_s = float(os.environ.get(HOLD_REPLY_S, "0"))
        if hold_s > 0 and message.metadata.message_type == MessageType.TRAIN and \
                message.content[wire.CONFIG_KEY]["server-round"] == int(os.environ[HOLD_ROUND]):
            time.sleep(max(0.0, message.metadata.created_at + hold_s - time.time()))
        return sepal_app(message, context)


app = HeldClientApp()
