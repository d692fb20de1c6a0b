"""ServerApp: build the strategy, run the rounds, write the run's outputs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sepal import logs
from sepal.codecs.downlink import downlink_for
from sepal.data import check_labels_within, check_training_classes
from sepal.model import get_weights
from sepal.privacy.engine import check_run_settings
from sepal.settings import Settings
from sepal.task import (
    build_task_model,
    centralized_train_split,
    run_label_names,
    run_train_size,
    server_test_split,
)
from server.central_dp import check_user_level_rounding, wrap_with_user_level_dp
from server.checkpoint import open_checkpoints, privacy_ledger
from server.evaluation import ServerEvaluator
from server.export import export_run
from server.privacy_monitor import PrivacyMonitor
from server.privacy_statement import write_privacy_statement
from server.progress import run_header, run_summary_lines
from server.run_output import RunOutput, claim_run_folder
from server.secure_aggregation import federation_class
from server.validation import UpdateValidator
from strategies import build_strategy, strategy_traits
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
    settings = Settings.from_mapping(context.run_config)
    cfg, compression = settings.run, settings.compression
    label_names = run_label_names(cfg)
    check_labels_within(server_test_split(cfg), label_names, f"split '{cfg.test_split}'")
    train_size = run_train_size(cfg)
    if train_size is not None:  # else each client checks against its own data
        check_training_classes(centralized_train_split(cfg))
        check_run_settings(settings.dp, cfg, train_size)
    chosen = settings.strategy
    traits, wrappers = strategy_traits(chosen.strategy), active_wrappers(settings)
    check_composition(chosen.strategy, traits, wrappers)
    streaming = aggregates_by_weighted_mean(traits, wrappers)
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
    strategy = wrap_with_user_level_dp(strategy, settings.user_dp, grid, cfg)
    make_federation = federation_class(settings.secagg, settings.user_dp)
    validator = UpdateValidator(settings.validation)
    run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-run{grid.run.run_id}"
    with claim_run_folder(Path(cfg.output_dir) / run_name, settings.checkpoint.resume):
        checkpoints, resume_from = open_checkpoints(settings.checkpoint, cfg, run_name,
                                                    context.run_config)
        ledger = privacy_ledger(run_name, settings.checkpoint, resume_from)
        output = RunOutput(Path(cfg.output_dir) / run_name, settings.as_dict())
        model = build_task_model(cfg, label_names, settings.lora)
        for line in run_header(run_name, settings, model, len(list(grid.get_node_ids())),
                               output.folder.resolve(), streaming):
            log.info(line)
        initial = get_weights(model)
        del model
        check_user_level_rounding(settings.user_dp, sum(v.size for v in initial.values()),
                                  compression.upload_codec, settings.secagg)
        evaluator = ServerEvaluator(cfg, label_names, settings.lora)
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
