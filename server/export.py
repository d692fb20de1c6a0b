"""Write a run's int8 model for CPU serving: ``sepal-export RUN_DIR``.

Reads ``RUN_DIR/model/`` (fp32; a LoRA adapter folder is merged into its base first) and
writes ``RUN_DIR/model-int8/``: the model exported to ONNX, its BERT subgraphs fused by
ONNX Runtime's transformer optimizer, then dynamically quantized (int8 weights, int8
activations quantized per batch), with the tokenizer and ``config.json``. ONNX Runtime's
int8 is kept over PyTorch's dynamic quantization because the latter quantizes only Linear
layers: the word-embedding table, half of MiniLM's parameters, stays fp32
(``docs/serving.md``; ``benchmarks/serving.py`` measures both).
The run also writes it at the end when its config sets ``export-quantized = true``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from sepal.inference import FP32_FOLDER, INT8_FOLDER, ONNX_FILE, InferenceError, OnnxBackend

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# an fp32 ONNX graph that differs from PyTorch by more than this is a broken export
EXPORT_TOLERANCE = 1e-3
# one padded batch (traced: the attention mask must stay in the graph) and one of a single text
CHECK_TEXTS = (["a gorgeous, witty, seductive movie.", "dull", "the plot is thin but the cast is "
                "lively enough to carry it through the slower middle stretch"],
               ["an unpadded single sentence"])


class ExportError(RuntimeError):
    """The model could not be exported, or the export does not reproduce the model."""


def load_fp32(model_dir: Path) -> torch.nn.Module:
    """The classifier in ``model_dir``; a PEFT (LoRA) adapter folder comes back merged."""
    import sepal.model  # noqa: F401  (registers the mean-pooling classifier)

    if (model_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(model_dir))
        return model.merge_and_unload().eval()
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()


def export_onnx(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """``model`` as an fp32 ONNX graph with dynamic batch and sequence axes, checked
    against PyTorch on a padded batch and on a single text."""
    example = tokenizer(CHECK_TEXTS[0], padding=True, return_tensors="pt")
    names = [name for name in INPUT_NAMES if name in example]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    # TorchScript exporter: the torch.export one (torch 2.9+) specialises BERT's attention
    # mask on the example and drifts from PyTorch on other shapes
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(model, (), str(path), kwargs={n: example[n] for n in names},
                          input_names=names, output_names=["logits"],
                          dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    session = OnnxBackend(path, threads=1, format="onnx-fp32")
    for texts in CHECK_TEXTS:
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = model(**{n: encoded[n] for n in names}).logits.numpy()
        got = session.logits({n: encoded[n].numpy() for n in names})
        gap = float(np.abs(got - expected).max())
        if gap > EXPORT_TOLERANCE:
            raise ExportError(f"the ONNX export differs from the PyTorch model by {gap:.2e} "
                              f"on {len(texts)} text(s) (tolerance {EXPORT_TOLERANCE})")


def fuse_onnx(source: Path, target: Path, num_heads: int, hidden_size: int) -> None:
    """ONNX Runtime's BERT fusions: attention, embedding and skip layer norms, GELU."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(source), model_type="bert", num_heads=num_heads,
                   hidden_size=hidden_size).save_model_to_file(str(target))


def quantize_onnx(source: Path, target: Path) -> None:
    """Dynamic int8 quantization: weights per output channel, activations per batch."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the fused operators (com.microsoft domain) defeat ONNX shape inference: fp32 it is
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})


def export_int8(model_dir: Path, target: Path, max_length: int | None = None) -> Path:
    """Write the int8 serving model of ``model_dir`` to ``target`` (replaced whole)."""
    from transformers import AutoTokenizer

    model_dir, target = Path(model_dir), Path(target)
    if not (model_dir / "config.json").is_file():
        raise InferenceError(f"{model_dir} holds no exported model (no config.json)")
    model = load_fp32(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if max_length is not None:
        tokenizer.model_max_length = max_length
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    staging.chmod(model_dir.stat().st_mode & 0o777)
    try:
        exported, fused = staging / "exported.onnx", staging / "fused.onnx"
        export_onnx(model, tokenizer, exported)
        fuse_onnx(exported, fused, model.config.num_attention_heads, model.config.hidden_size)
        quantize_onnx(fused, staging / ONNX_FILE)
        exported.unlink()
        fused.unlink()
        model.config.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_run(run_dir: str | Path) -> Path:
    """``RUN_DIR/model-int8/`` from ``RUN_DIR/model/``, truncating inputs to the run's
    ``max_seq_length`` (from its ``config.json``) when the run recorded one."""
    run_dir = Path(run_dir)
    if not (run_dir / FP32_FOLDER / "config.json").is_file():
        raise InferenceError(f"{run_dir} is not a run folder with a model "
                             f"({FP32_FOLDER}/config.json missing)")
    max_length = None
    run_config = run_dir / "config.json"
    if run_config.is_file():
        try:
            max_length = int(json.loads(run_config.read_text(encoding="utf-8"))["max_seq_length"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise InferenceError(f"{run_config}: no readable 'max_seq_length' ({err!r})") from err
    return export_int8(run_dir / FP32_FOLDER, run_dir / INT8_FOLDER, max_length)


def weights_size(folder: Path) -> int:
    """Bytes of the model weights alone (the tokenizer and configs are the same size in every
    format)."""
    return sum(path.stat().st_size for path in Path(folder).iterdir()
               if path.suffix in (".onnx", ".safetensors", ".bin", ".pt"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's output folder (holding model/)")
    args = parser.parse_args(argv)
    try:
        target = export_run(args.run_dir)
    except (InferenceError, ExportError) as err:
        print(f"sepal-export: {err}", file=sys.stderr)
        return 2
    fp32 = weights_size(Path(args.run_dir) / FP32_FOLDER)
    int8 = weights_size(target)
    print(f"int8 model written to {target}: {int8 / 2**20:.1f} MiB of weights, "
          f"{100 * int8 / fp32:.0f} % of the fp32 model's {fp32 / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
