"""One round's work on this node: train the global model and encode the update, or
evaluate it. Imports torch, transformers and Opacus; ``client.app`` imports this module
only inside its train and evaluate handlers."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from client.local_training import LocalTraining
from client.settings import run_settings
from sepal import logs, wire
from sepal.codecs import build_codec
from sepal.codecs.downlink import receive_global
from sepal.config import RunConfig
from sepal.data import DataError, make_loader
from sepal.model import resolve_device
from sepal.privacy import PrivacyRefusal, clip_update
from sepal.privacy.engine import ClientPrivacy
from sepal.privacy.user_level import Rounding
from sepal.task import NodeData, tokenized_node_split
from sepal.training import evaluate as evaluate_model

CODEC_STATE_KEY = "codec-state"


def train(msg: Message, context: Context) -> Message:
    logs.quiet_libraries()
    settings = run_settings(context)
    cfg = settings.run
    node = NodeData.from_mapping(context.node_config)
    config = msg.content[wire.CONFIG_KEY]
    global_weights = receive_global(msg.content, context.state)
    label_names = list(config["label-names"])
    server_round = int(config["server-round"])

    try:
        privacy = ClientPrivacy.for_node(
            context, cfg, settings.dp, len(tokenized_node_split(cfg, node, cfg.train_split)),
            config)
    except PrivacyRefusal as refusal:
        return Message(content=refusal.content(), reply_to=msg)
    training = LocalTraining(cfg, node, label_names, resolve_device(_node_device(context, cfg)),
                             lora=settings.lora)
    stats = training.run(global_weights, server_round, privacy,
                         proximal_mu=float(config.get("proximal-mu", 0.0)))  # sent by FedProx
    update = OrderedDict(
        (name, (local - global_weights[name]).astype(np.float32))
        for name, local in training.local_weights().items()
    )
    user_dp = settings.user_dp
    rounding = (Rounding.of_upload(sum(v.size for v in update.values()),
                                   str(config.get("upload-codec", "dense")), settings.secagg)
                if user_dp.enabled and user_dp.client_side else Rounding())
    clip_metrics = clip_update(update, config, user_dp, rounding)

    codec = build_codec(str(config.get("upload-codec", "dense")))
    state = context.state.get(CODEC_STATE_KEY) if CODEC_STATE_KEY in context.state else None
    payload, codec_params, new_state = codec.encode(update, state)
    if new_state is not None:
        context.state[CODEC_STATE_KEY] = new_state

    if privacy:  # nothing outside the ledger: the accounted noisy count, no loss or steps
        metrics = MetricRecord({wire.NUM_EXAMPLES: privacy.count, **clip_metrics})
    else:
        metrics = MetricRecord({
            wire.NUM_EXAMPLES: stats.examples_in_split,
            "train-loss": stats.loss,
            "train-accuracy": stats.accuracy,
            "train-steps": stats.steps,
            **clip_metrics,
        })
    content = RecordDict({
        wire.UPDATE_KEY: payload,
        wire.CODEC_KEY: codec_params,
        wire.METRICS_KEY: metrics,
    })
    if privacy:
        content[wire.PRIVACY_KEY] = privacy.report()
    return Message(content=content, reply_to=msg)



def evaluate(msg: Message, context: Context) -> Message:
    logs.quiet_libraries()
    settings = run_settings(context)
    cfg = settings.run
    node = NodeData.from_mapping(context.node_config)
    config = msg.content[wire.CONFIG_KEY]
    label_names = list(config["label-names"])
    device = resolve_device(_node_device(context, cfg))
    training = LocalTraining(cfg, node, label_names, device, lora=settings.lora)
    training.load(wire.record_to_arrays(msg.content[wire.ARRAYS_KEY]))
    try:
        dataset = tokenized_node_split(cfg, node, cfg.test_split)
    except DataError as err:
        raise DataError(f"evaluation on this node: {err}") from err
    stats = evaluate_model(training.model, make_loader(dataset, cfg.batch_size, False, cfg.seed),
                           device, len(label_names))
    metrics = MetricRecord({
        wire.NUM_EXAMPLES: stats.examples,
        "eval-loss": stats.loss,
        "eval-accuracy": stats.accuracy,
        "eval-macro-f1": stats.macro_f1,
    })
    return Message(content=RecordDict({wire.METRICS_KEY: metrics}), reply_to=msg)


def _node_device(context: Context, cfg: RunConfig) -> str:
    """A site may pin its device in its node config; otherwise the run's setting."""
    return str(context.node_config.get("device", cfg.device))
