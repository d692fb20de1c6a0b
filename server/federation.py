"""The round loop.

Flower's ``Strategy.start`` runs rounds with no place to decode uploads before
aggregation, to stop on too few clients, or to resume from a checkpoint, so the
ServerApp drives the same steps itself while the strategy keeps doing what it does
(``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``). One round:

    configure_train -> send/receive -> decode + validate uploads -> aggregate_train
    -> evaluate (server, optionally clients) -> record -> checkpoint

For a strategy that aggregates by a weighted mean, "send/receive -> decode + validate"
sums each upload as it arrives and hands ``aggregate_train`` one reply
(``server/streaming.py``); other strategies get every decoded upload.

Node sampling is reproducible: Flower samples with ``random.sample`` over the grid's
node ids, so the round loop hands the strategy the ids sorted and seeds Python's
``random`` per (seed, round) just before. A resumed round therefore samples the
same nodes as the interrupted one did (while the same SuperNodes are connected).
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from sepal import wire
from sepal.codecs.downlink import DownlinkBroadcaster
from sepal.codecs.measure import dense_upload_size, transfer_metrics
from sepal.config import RunConfig
from sepal.training import evaluation_record
from server.checkpoint import Checkpoint, Checkpointer, capture_rng, restore_rng
from server.evaluation import ServerEvaluator
from server.central_dp import UserLevelDP
from server.privacy_monitor import PrivacyMonitor
from server.late_replies import LateReplies
from server.progress import round_line
from server.run_output import RunOutput
from server.streaming import StreamingRound
from server.uploads import DecodedRound, decode_replies
from server.validation import MAX_MAGNITUDE, UpdateValidator
from strategies.state import StrategyStateError, load_strategy_state, strategy_state

log = logging.getLogger("sepal.server")

# Streaming under the median norm rule: at most this many updates (one model each) are
# held out of the running sum until the round's limit is known.
MAX_HELD_ASIDE = 8
GRPC_PULL_INTERVAL_S = 3.0  # Flower's gRPC grid polls this often in send_and_receive


class Federation:
    def __init__(self, grid: Grid, strategy: Strategy, cfg: RunConfig, label_names: list[str],
                 evaluator: ServerEvaluator, output: RunOutput,
                 train_config: dict[str, Any] | None = None,
                 downlink: DownlinkBroadcaster | None = None,
                 privacy: PrivacyMonitor | None = None,
                 validator: UpdateValidator | None = None,
                 checkpoints: Checkpointer | None = None, streaming: bool = False):
        self.grid = grid
        self.strategy = strategy
        self.cfg = cfg
        self.label_names = label_names
        self.evaluator = evaluator
        self.output = output
        self.train_config = dict(train_config or {})
        self.privacy = privacy or PrivacyMonitor(cfg.min_train_nodes)
        self.validator = validator or UpdateValidator()
        self.checkpoints = checkpoints
        self.arrays_key = getattr(strategy, "arrayrecord_key", wire.ARRAYS_KEY)
        self.downlink = downlink  # compressed global-model deltas, None = dense arrays
        self.late_replies = LateReplies(grid)
        # sum uploads as they arrive: for strategies aggregating by a weighted mean
        # (``strategies.compatibility.aggregates_by_weighted_mean``)
        self.streaming = streaming
        self.held_aside = 1  # streaming: updates kept out of the sum until the round closes

    def run(self, weights: OrderedDict[str, np.ndarray],
            resume_from: Checkpoint | None = None) -> OrderedDict[str, np.ndarray]:
        """Run every round; with ``resume_from``, continue after its round instead."""
        if resume_from is None:
            started, first_round = time.time(), 1
            self.output.record_round({"round": 0, **self._evaluate(weights), "elapsed_s": 0.0})
        else:
            weights = self.restore(resume_from)
            started = time.time() - float(resume_from.metrics[-1].get("elapsed_s", 0.0))
            first_round = resume_from.round + 1
        for server_round in range(first_round, self.cfg.num_server_rounds + 1):
            weights = self.run_round(server_round, weights, started)
            if self.privacy.stop_reason:
                log.warning("run ends after round %d: %s", server_round, self.privacy.stop_reason)
                break
        return weights

    def snapshot(self, server_round: int, weights: OrderedDict[str, np.ndarray]) -> Checkpoint:
        return Checkpoint(round=server_round, weights=weights,
                          strategy=strategy_state(self.strategy), rng=capture_rng(),
                          metrics=self.output.rounds, validator=self.validator.state_dict())

    def restore(self, checkpoint: Checkpoint) -> OrderedDict[str, np.ndarray]:
        """Put the server back where ``checkpoint`` was taken; returns its global model."""
        load_strategy_state(self.strategy, checkpoint.strategy)
        self.validator.load_state_dict(checkpoint.validator)
        self.output.restore(checkpoint.metrics)
        self.privacy.restore(checkpoint.metrics)
        restore_rng(checkpoint.rng)
        return checkpoint.weights

    def run_round(self, server_round: int, weights: OrderedDict[str, np.ndarray],
                  started: float) -> OrderedDict[str, np.ndarray]:
        round_start = time.time()
        config = ConfigRecord({**self.train_config, "label-names": self.label_names})
        self._seed_node_sampling(server_round, "train")
        messages = list(self.strategy.configure_train(
            server_round, wire.arrays_to_record(weights), config, _SortedNodeIds(self.grid)))
        dense_down = wire.serialized_size(messages[0].content) if messages else 0
        if self.downlink is not None:
            self.downlink.advance(weights, server_round)
            messages = self.downlink.address(messages, self.arrays_key)
        bytes_down = {m.metadata.dst_node_id: wire.serialized_size(m.content) for m in messages}
        decoded = self.collect_updates(messages, weights)
        if self.downlink is not None:
            self.downlink.settle(bytes_down, set(decoded.failed) | set(decoded.timed_out))
        self.late_replies.remember(server_round, messages, decoded.timed_out,
                                   self.cfg.round_timeout)
        late = self.late_replies.discard_arrived(server_round)
        self.validator.count_offences(decoded.rejected)
        record: dict[str, Any] = {
            "round": server_round,
            "clients": decoded.clients,
            "sampled": len(messages),
            "failed": len(decoded.failed),
            "rejected": len(decoded.rejected),
            "timed_out": len(decoded.timed_out),
            "refused": len(decoded.refused),
            "late_discarded": len(late),
        }
        if decoded.aggregate_refused:
            log.warning("round %d: aggregate refused, global model kept: %s", server_round,
                        decoded.aggregate_refused)
            record["aggregate_refused"] = decoded.aggregate_refused
            if self.streaming:
                self._hold_more_aside(server_round, decoded.out_of_bounds)
        elif decoded.accepted and decoded.clients >= self.cfg.min_train_nodes:
            aggregated, train_metrics, refused = self._aggregate(server_round, decoded, weights)
            if refused:
                log.warning("round %d: aggregate refused, global model kept: %s", server_round,
                            refused)
                record["aggregate_refused"] = refused
            else:
                weights = aggregated
            record.update(_train_summary(decoded.accepted, train_metrics))
        else:
            log.warning("round %d: %d valid update(s) < min-train-nodes %d; global model kept",
                        server_round, decoded.clients, self.cfg.min_train_nodes)
            record["skipped"] = True
        record.update(self.privacy.round_record(decoded, len(list(self.grid.get_node_ids()))))
        record.update(self._evaluate(weights))
        record.update(self._federated_evaluation(server_round, weights))
        if decoded.rejected:
            record["rejected_reasons"] = {str(k): v for k, v in decoded.rejected.items()}
        record["offenders"] = self.validator.offenders()
        record["bytes_down_per_client"] = {str(k): v for k, v in bytes_down.items()}
        record["bytes_up_per_client"] = {str(k): v for k, v in decoded.bytes_up.items()}
        record.update(transfer_metrics(decoded.bytes_up, bytes_down,
                                       dense_upload_size(weights, _any_metrics(decoded)),
                                       dense_down))
        record.update(decoded.summary)
        record["wall_time_s"] = round(time.time() - round_start, 3)
        record["elapsed_s"] = round(time.time() - started, 3)
        self.output.record_round(record)
        if self.checkpoints is not None:
            self.checkpoints.save(self.snapshot(server_round, weights))
        log.info(round_line(record, self.cfg.num_server_rounds))
        return weights

    def _aggregate(self, server_round: int, decoded: DecodedRound,
                   weights: OrderedDict[str, np.ndarray]):
        """The strategy's aggregate, its metrics and why it was refused ("" if not): an
        aggregate that fails, or that is not finite everywhere, never becomes the model,
        and the strategy's state (momentum, moments) is put back as it was."""
        try:
            before = strategy_state(self.strategy)
        except StrategyStateError:  # a plug-in whose state cannot be saved keeps its own
            before = None
        try:
            aggregated, train_metrics, refused = self._aggregate_checked(server_round, decoded,
                                                                         weights)
        except Exception as err:  # noqa: BLE001  the round ends, the run goes on
            aggregated, train_metrics = weights, None
            refused = f"aggregation failed ({type(err).__name__}: {err})"
        if refused and before is not None:
            load_strategy_state(self.strategy, before)
        return aggregated, train_metrics, refused

    def _aggregate_checked(self, server_round: int, decoded: DecodedRound,
                           weights: OrderedDict[str, np.ndarray]):
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, decoded.accepted)
        if new_arrays is None:
            return weights, train_metrics, ""
        # kept in the model's dtype: FedOpt's step comes back float64 (its eta_norm is a
        # numpy float64), which would double every download
        aggregated = OrderedDict((k, v.numpy().astype(weights[k].dtype, copy=False))
                                 for k, v in new_arrays.items())
        bad = [name for name, array in aggregated.items()
               if array.size and not float(np.abs(array).max()) <= MAX_MAGNITUDE]  # NaN too
        if bad or list(aggregated) != list(weights):
            what = (f"tensor(s) {bad[:3]} not finite or beyond {MAX_MAGNITUDE:.3g}" if bad
                    else "tensor names differ")
            return weights, train_metrics, what
        return aggregated, train_metrics, ""

    def collect_updates(self, messages: list[Message],
                        weights: OrderedDict[str, np.ndarray]) -> DecodedRound:
        """Send the round's train instructions and return the decoded uploads: summed as
        they arrive (``server/streaming.py``), or all of them for the strategy to read."""
        if self.streaming:
            return self._stream_updates(messages, weights)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        # by instruction: the SuperLink itself answers for a node that went offline
        instruction_nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        decoded = decode_replies(replies, weights, self.arrays_key, instruction_nodes,
                                 self.validator)
        return _with_timed_out(decoded, instruction_nodes,
                               {reply.metadata.reply_to_message_id for reply in replies})

    def _stream_updates(self, messages: list[Message],
                        weights: OrderedDict[str, np.ndarray]) -> DecodedRound:
        """``Grid.send_and_receive``'s push, poll and timeout, with each reply pulled on
        its own (in node-id order within a poll) and summed before the next is pulled."""
        pending = [message_id for message_id in self.grid.push_messages(messages) if message_id]
        instruction_nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        pending.sort(key=lambda message_id: instruction_nodes.get(message_id, 0))
        stream = StreamingRound(weights, self.validator, instruction_nodes,
                                equal_weights=isinstance(self.strategy, UserLevelDP),
                                held_aside=self.held_aside)
        answered: set[str] = set()
        end_time = time.time() + self.cfg.round_timeout
        while time.time() < end_time:
            for message_id in pending:
                for reply in self.grid.pull_messages([message_id]):
                    answered.add(reply.metadata.reply_to_message_id)
                    stream.add(reply)
            pending = [message_id for message_id in pending if message_id not in answered]
            if not pending:
                break
            time.sleep(getattr(self.grid, "pull_interval", GRPC_PULL_INTERVAL_S))
        return _with_timed_out(stream.finish(self.arrays_key, messages), instruction_nodes,
                               answered)

    def _hold_more_aside(self, server_round: int, out_of_bounds: int) -> None:
        """After a streaming round lost to more out-of-bounds updates than were held aside:
        hold as many aside as there were (at most ``MAX_HELD_ASIDE``, each one model's
        memory), or, beyond that, collect every update from the next round on."""
        if out_of_bounds <= MAX_HELD_ASIDE:
            self.held_aside = max(self.held_aside, out_of_bounds)
            log.warning("from round %d on, the %d largest updates are held aside until the "
                        "round's norm limit is known", server_round + 1, self.held_aside)
        else:
            self.streaming = False
            log.warning("every update is collected before aggregating from round %d on",
                        server_round + 1)

    def _seed_node_sampling(self, server_round: int, stage: str) -> None:
        """Flower samples nodes with the global ``random`` (see the module docstring)."""
        random.seed(f"{self.cfg.seed}-{server_round}-{stage}")

    def _evaluate(self, weights) -> dict[str, Any]:
        return evaluation_record(self.evaluator(weights), self.label_names)

    def _federated_evaluation(self, server_round: int, weights) -> dict[str, Any]:
        if self.cfg.fraction_evaluate <= 0:
            return {}
        config = ConfigRecord({"label-names": self.label_names})
        self._seed_node_sampling(server_round, "evaluate")
        messages = self.strategy.configure_evaluate(server_round, wire.arrays_to_record(weights), config,
                                                    _SortedNodeIds(self.grid))
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        return {"client_eval": dict(metrics)} if metrics is not None else {}


def _with_timed_out(decoded: DecodedRound, instruction_nodes: dict[str, int],
                    answered: set[str]) -> DecodedRound:
    decoded.timed_out = [node for message_id, node in instruction_nodes.items()
                         if message_id not in answered]
    return decoded


def _any_metrics(decoded: DecodedRound) -> MetricRecord:
    """A reply's metrics, to measure the dense upload baseline with the same record."""
    if decoded.client_metrics is not None:
        return decoded.client_metrics
    for message in decoded.accepted:
        return message.content[wire.METRICS_KEY]
    return MetricRecord({wire.NUM_EXAMPLES: 1})


class _SortedNodeIds:
    """The grid with its node ids in ascending order (see the module docstring)."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _train_summary(accepted: list[Message], metrics) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "examples": sum(int(m.content[wire.METRICS_KEY][wire.NUM_EXAMPLES]) for m in accepted),
    }
    # DP sites send no training loss: a mean over the others would pass for everyone's
    if metrics is not None and all("train-loss" in m.content[wire.METRICS_KEY] for m in accepted):
        summary["train_loss"] = float(metrics.get("train-loss", float("nan")))
        summary["train_accuracy"] = float(metrics.get("train-accuracy", float("nan")))
    return summary
