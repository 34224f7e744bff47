"""``dass-export``: checkpoint -> Triton model folder (ONNX fp32 / fp16 / INT8, optional TensorRT plan).

A click command; ``dass_deploy.cli`` re-exports ``export_main``, the pyproject entry point. Torch is imported only
when the export runs, so ``--help`` and usage errors are quick.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import rich_click as click

from dass_deploy.cli_common import (
    OK,
    Signals,
    adapt_frames_option,
    adapt_frames_value,
    adapt_passes_option,
    adapt_passes_value,
    fail,
    finish,
    require_extra,
    run_command,
)
from dass_deploy.errors import DeployError
from dass_deploy.repository import check_model_name, user_models_dir

EPILOG = (
    "Exit status: 0 ok, 1 an extra the options need is not installed, 2 usage or setup error (nothing written in "
    "either case), 130 Ctrl-C, 143 SIGTERM."
)


def _require_option_extras(args: dict) -> None:
    """``--openvino`` needs the openvino extra, ``--int8`` with an NNCF quantiser (its default without ``--trt``)
    the int8 extra: without it, the one line naming it and exit 1, before torch loads or anything is written. NNCF
    with ``--trt`` is left to the exporter, which refuses the combination whatever is installed."""
    if args["int8"] and not args["trt"]:
        calibration = args["int8_calibration"]
        if calibration is None or calibration.startswith("nncf"):  # the default: precision.default_int8_method
            option = "--int8" if calibration is None else f"--int8-calibration {calibration}"
            require_extra(f"dass-export {option}", "int8")
    if args["openvino"]:
        require_extra("dass-export --openvino", "openvino")


def _name_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The model name becomes a folder and a quoted string in config.pbtxt: check it before any work."""
    if value is not None:
        try:
            check_model_name(value)
        except DeployError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@click.command(
    "dass-export",
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--name",
    callback=_name_option,
    help="Model folder name: letters, digits, '_', '.', '-' (default: <checkpoint stem>-<precision>[-trt]).",
)
@click.option(
    "--out",
    default=lambda: str(user_models_dir()),
    show_default="models, or $DASS_MODELS",
    type=click.Path(file_okay=False),
    help="Model repository folder.",
)
@click.option(
    "--height", type=click.IntRange(min=8), default=512, show_default=True, help="Input height the graph is built for."
)
@click.option(
    "--width", type=click.IntRange(min=8), default=1024, show_default=True, help="Input width the graph is built for."
)
@click.option("--dynamic", is_flag=True, help="Dynamic height/width axes (batch is always dynamic).")
@click.option(
    "--output",
    type=click.Choice(("labels", "logits")),
    default="labels",
    show_default=True,
    help="labels: uint8 [N,H,W] class map (argmax in the graph); logits: float32 [N,K,H,W].",
)
@click.option("--fp16", is_flag=True, help="float16 weights and convolutions, float32 IO.")
@click.option("--int8", is_flag=True, help="INT8 static quantisation (QDQ); needs --calib.")
@click.option(
    "--calib",
    type=click.Path(exists=True, file_okay=False),
    help="Folder of target-domain images for INT8 calibration.",
)
@click.option(
    "--calib-max", type=click.IntRange(min=1), default=64, show_default=True, help="Use at most this many calib images."
)
@click.option(
    "--int8-val",
    type=click.Path(exists=True, file_okay=False),
    help="Cityscapes-layout val folder (leftImg8bit/, gtFine/): refuse INT8 if mIoU drops by more than 1 point.",
)
@click.option(
    "--int8-calibration",
    type=click.Choice(("nncf", "nncf-accuracy", "minmax", "percentile", "entropy")),
    default=None,
    help="INT8 quantiser and calibration: nncf (NNCF with bias correction; needs dass[int8]), nncf-accuracy (nncf, "
    "then the layers that cost the most mIoU on --int8-val go back to float until the gate holds) or ONNX Runtime's "
    "minmax / percentile / entropy ranges. [default: nncf; percentile with --trt]",
)
@click.option(
    "--int8-keep-float",
    default=None,
    metavar="LAYERS",
    help="Comma list of layers left in float in an INT8 model (first_conv, classifier), or 'none'. "
    "[default: none with nncf, first_conv,classifier otherwise]",
)
@click.option("--trt", is_flag=True, help="Also build a TensorRT plan (needs a CUDA GPU and tensorrt).")
@click.option(
    "--openvino",
    is_flag=True,
    help="Also write OpenVINO IR (1/model.xml, .bin): compiles faster than the ONNX file (needs dass[openvino]).",
)
@click.option(
    "--from",
    "source",
    type=click.Choice(("auto", "dass", "adaptseg", "bida-authors", "proda")),
    default="auto",
    show_default=True,
    help="Key layout of the checkpoint (auto: detected from the keys).",
)
@click.option(
    "--stem",
    type=click.Choice(("source", "target")),
    help="Which stem of the authors' two-stem checkpoints to use (default: target, the one for real images).",
)
@click.option(
    "--adapt-bn",
    "adapt_bn_source",
    metavar="SOURCE",
    help="Re-estimate the BatchNorm statistics on unlabelled frames of SOURCE (anything dass-segment reads: image "
    "folder, glob, video, camera, stream) at the export size before exporting; meta.json and the model card "
    "record it. Measured to help trainable-BN models; warns for frozen-BN ones (docs/ADAPT_BN.md).",
)
@adapt_frames_option
@adapt_passes_option
@click.option(
    "--keep-bn",
    is_flag=True,
    help="Keep the BatchNorm nodes (fp32) instead of folding them into the convolutions, so that dass-segment "
    "--model M --adapt-bn SOURCE can re-estimate them without PyTorch (docs/ADAPT_BN.md).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing <out>/<name>.")
@click.option("--force", is_flag=True, help="Write the model even if the parity check fails.")
@click.option(
    "--parity-samples", type=click.IntRange(min=1), default=3, show_default=True, help="Inputs for the parity check."
)
@click.option("--quiet", is_flag=True, help="No progress messages, only the summary.")
def export(**args: object) -> None:
    """Export a DeepLab-V2 checkpoint to ONNX in a Triton model-repository folder.

    Checkpoint layouts: dass, AdaptSegNet, the BiDA authors', ProDA (loaded with torch.load(weights_only=True)).
    The folder is <out>/<name>/{config.pbtxt, meta.json, 1/model.onnx[, 1/model.plan]}. The graph takes RGB
    float32 0..255 [N,3,H,W], normalises inside and returns full-resolution class maps. A parity check against
    torch runs before anything is written.

    \b
    Examples:
      dass-export runs/bida/final.pt                     # models/final-fp32, 512x1024, uint8 labels
      dass-export final.pt --name bida-r101 --dynamic    # any batch / height / width
      dass-export final.pt --int8 --calib data/cityscapes/leftImg8bit/train/aachen
      dass-export authors_gta2city.pth --from bida-authors --stem target --output logits
      dass-export final.pt --trt --fp16                  # needs a CUDA GPU and 'dass[gpu]'
      dass-export final.pt --adapt-bn dashcam.mp4        # BN statistics of the user's camera
    """
    quiet = bool(args.pop("quiet"))
    args["adapt_frames"] = adapt_frames_value(args["adapt_bn_source"], args["adapt_frames"])
    args["adapt_passes"] = adapt_passes_value(args["adapt_bn_source"], args["adapt_passes"])
    keep = args.pop("int8_keep_float")
    if keep is not None:  # None: the default of the chosen quantiser
        keep = () if keep.strip().lower() == "none" else tuple(k.strip() for k in keep.split(",") if k.strip())
    args["int8_keep_float"] = keep
    _require_option_extras(args)
    with Signals() as signals:
        try:
            from dass_deploy.export import export_model
            from dass_train.errors import UserError

            try:
                result = export_model(args.pop("checkpoint"), progress=not quiet, **args)
            except (DeployError, UserError) as exc:
                fail(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted (an unfinished export writes nothing)", err=True)
            finish(signals.exit_code)
    click.echo("\n".join(result.summary))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    finish(OK)


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dass-export``; returns the exit status (0 ok, 1 a needed extra is not installed, 2 setup
    error, 130 Ctrl-C, 143 SIGTERM).
    ``--help`` and usage errors exit like argparse did (``SystemExit``)."""
    return run_command(export, argv, "dass-export")


if __name__ == "__main__":
    sys.exit(export_main())
