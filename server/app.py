"""ServerApp: build the strategy, run the rounds, write the run's outputs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sepal import logs
from sepal.codecs import CompressionConfig
from sepal.codecs.downlink import downlink_for
from sepal.config import RunConfig
from sepal.data import check_labels_within, check_training_classes
from sepal.lora import LoraSettings
from sepal.model import get_weights
from sepal.privacy import DPSGDSettings, UserLevelDPSettings
from sepal.privacy.engine import check_run_settings
from sepal.secagg.config import SecAggConfig
from sepal.task import (
    build_task_model,
    centralized_train_split,
    run_label_names,
    run_train_size,
    server_test_split,
)
from server.central_dp import check_user_level_rounding, wrap_with_user_level_dp
from server.checkpoint import CheckpointConfig, open_checkpoints, privacy_ledger
from server.evaluation import ServerEvaluator
from server.export import export_run
from server.privacy_monitor import PrivacyMonitor
from server.privacy_statement import write_privacy_statement
from server.progress import run_header, run_summary_lines
from server.run_output import RunOutput, all_settings, claim_run_folder
from server.secure_aggregation import federation_class
from server.validation import UpdateValidator, ValidationConfig
from strategies import StrategyConfig, build_strategy, strategy_traits
from strategies.compatibility import (
    active_wrappers,
    aggregates_by_weighted_mean,
    check_composition,
)

log = logging.getLogger("sepal.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logs.configure()
    serve(grid, context)


def serve(grid: Grid, context: Context) -> Path:
    """Everything the ServerApp does for one run; returns the run's output folder."""
    started = time.time()
    cfg = RunConfig.from_mapping(context.run_config)
    compression = CompressionConfig.from_mapping(context.run_config)
    label_names = run_label_names(cfg)
    check_labels_within(server_test_split(cfg), label_names, f"split '{cfg.test_split}'")
    train_size = run_train_size(cfg)
    if train_size is not None:  # else each client checks against its own data
        check_training_classes(centralized_train_split(cfg))
        check_run_settings(DPSGDSettings.from_run_config(context.run_config), cfg, train_size)
    lora = LoraSettings.from_run_config(context.run_config)
    chosen = StrategyConfig.from_mapping(context.run_config)
    traits, wrappers = strategy_traits(chosen.strategy), active_wrappers(context.run_config)
    check_composition(chosen.strategy, traits, wrappers)
    user_dp = UserLevelDPSettings.from_run_config(context.run_config)
    # adaptive clipping counts each reply's clipped bit, which one summed reply does not carry
    streaming = aggregates_by_weighted_mean(traits, wrappers) and not (
        user_dp.enabled and user_dp.adaptive)
    strategy = build_strategy(
        chosen.strategy,
        params=chosen.params(),
        common={
            "fraction_train": cfg.fraction_train,
            "fraction_evaluate": cfg.fraction_evaluate,
            "min_train_nodes": cfg.min_train_nodes,
            "min_evaluate_nodes": cfg.min_train_nodes if cfg.fraction_evaluate > 0 else 0,
            "min_available_nodes": cfg.min_available_nodes,
        },
    )
    strategy = wrap_with_user_level_dp(strategy, user_dp, grid, cfg)
    make_federation = federation_class(context.run_config, strategy)  # refuses bad combinations
    validator = UpdateValidator(ValidationConfig.from_mapping(context.run_config))
    run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-run{grid.run.run_id}"
    checkpoint_settings = CheckpointConfig.from_mapping(context.run_config)
    with claim_run_folder(Path(cfg.output_dir) / run_name, checkpoint_settings.resume):
        checkpoints, resume_from = open_checkpoints(checkpoint_settings, cfg, run_name,
                                                    context.run_config)
        ledger = privacy_ledger(run_name, checkpoint_settings, resume_from)
        output = RunOutput(Path(cfg.output_dir) / run_name, all_settings(context.run_config))
        model = build_task_model(cfg, label_names, lora)
        for line in run_header(run_name, cfg, model, len(list(grid.get_node_ids())), chosen,
                               compression, context.run_config, output.folder.resolve()):
            log.info(line)
        initial = get_weights(model)
        del model
        check_user_level_rounding(UserLevelDPSettings.from_run_config(context.run_config),
                                  sum(v.size for v in initial.values()),
                                  compression.upload_codec,
                                  SecAggConfig.from_mapping(context.run_config))
        evaluator = ServerEvaluator(cfg, label_names, lora)
        federation = make_federation(grid, strategy, cfg, label_names, evaluator, output,
                                     train_config={"upload-codec": compression.upload_codec,
                                                   **ledger.to_config()},
                                     downlink=downlink_for(compression),
                                     privacy=PrivacyMonitor(cfg.min_train_nodes, strategy),
                                     validator=validator, checkpoints=checkpoints,
                                     streaming=streaming)
        final = federation.run(initial, resume_from=resume_from)
        write_privacy_statement(output.folder, federation.privacy.statement())
        evaluator.export(final, output.model_path)
        checkpoint_folder = checkpoints.folder if checkpoints is not None else None
        summary = output.write_summary(time.time() - started, checkpoint_folder)
        output.close()
        for line in run_summary_lines(summary):
            log.info(line)
        if cfg.export_quantized:
            log.info("int8 serving model saved to %s", export_run(output.folder).resolve())
        return output.folder
