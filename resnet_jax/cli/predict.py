"""`predict.py` / `resnet-jax-predict`: classify images with a trained or converted ResNet."""

from __future__ import annotations

import argparse
import json
import sys

from resnet_jax.cli import report_skipped, run

__all__ = ["DEFAULT_CAM_DIR", "main", "parse_args", "predict"]

DEFAULT_CAM_DIR = "gradcam"  # where --cam writes, relative to the working directory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of `predict.py`."""
    parser = argparse.ArgumentParser(
        description="Predict the class of images (files or folders) with ResNet weights.",
        epilog="Exit status: 0 all predicted, 1 error, 2 some unreadable images were skipped.",
    )
    add = parser.add_argument
    add("images", nargs="+", metavar="IMAGE", help="image files or folders")
    add(
        "--weights",
        required=True,
        help=".msgpack from train.py/convert_weights.py, .pth/.safetensors, or hf:ORG/NAME "
        "on the Hugging Face hub (e.g. hf:timm/resnet50.tv_in1k)",
    )
    add(
        "--class-indices",
        help="class names (default: those in the weights' metadata, else class_indices.json "
        "beside the weights)",
    )
    add("--arch", help="architecture, e.g. resnet50 (default: from the weights)")
    add(
        "--top-k", type=int, help="show the k most probable classes (default: all up to 10, else 5)"
    )
    add("--json", action="store_true", help="print one JSON document")
    add("--plot", action="store_true", help="show the images with their top class")
    add("--save-plot", metavar="FILE", help="write that figure to FILE (.png, .pdf)")
    add(
        "--cam",
        action="store_true",
        help="also draw each image's Grad-CAM heat map of its top class (over the last stage), "
        "one PNG per image, IMAGE_STEM.cam.png in --cam-dir",
    )
    add(
        "--cam-dir",
        metavar="DIR",
        help="folder for the --cam PNGs (default: gradcam); implies --cam",
    )
    add("--output", metavar="FILE", help="also write the results to FILE.csv or FILE.json")
    add("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    add(
        "--image-size",
        type=int,
        metavar="PIXELS",
        help="crop size; the resize keeps its proportion (default: the size the weights were "
        "trained and validated at, from their metadata; else the architecture's ImageNet one)",
    )
    return parser.parse_args(argv)  # fmt: skip


def predict(args: argparse.Namespace) -> int:
    """What `predict.py` does; returns the exit status (0, or EXIT_SKIPPED if images were
    skipped). Raises UserError for anything that stops the whole run."""
    from resnet_jax.data.transforms import BadImage
    from resnet_jax.inference import output as show
    from resnet_jax.inference.predictor import Predictor, find_images
    from resnet_jax.runtime.cache import enable_compilation_cache
    from resnet_jax.runtime.errors import UserError

    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, not {args.top_k}.")
    if args.output is not None:
        show.output_format(args.output)
    if args.plot or args.save_plot:
        show.check_plot_path(args.save_plot, args.plot)  # before the slow part
    cam_dir = args.cam_dir or (DEFAULT_CAM_DIR if args.cam else None)
    if cam_dir is not None:
        show.check_cam_dir(cam_dir)
    paths = find_images(args.images)

    enable_compilation_cache()  # a second run with the same batch shape skips compilation
    predictor = Predictor.load(args.weights, args.arch, args.class_indices, args.image_size)
    skipped: list[BadImage] = []

    def on_skip(error: BadImage) -> None:
        skipped.append(error)
        print(f"skipped: {error}", file=sys.stderr)

    # One image on its own fails the run; among several, a bad one is reported and skipped.
    on_skip_or_raise = on_skip if len(paths) > 1 else None
    predictions = predictor.predict_files(
        paths, args.batch_size, on_skip_or_raise, cam=cam_dir is not None
    )
    if not predictions:
        raise UserError(f"None of the {len(paths)} images could be read; see the lines above.")

    classes = predictor.classes
    if args.json:
        print(json.dumps(show.to_records(predictions, classes, args.top_k), indent=2))
    else:
        print(show.format_text(predictions, classes, args.top_k))
    if args.output is not None:
        show.write_output(args.output, show.to_records(predictions, classes, args.top_k))
    if args.plot or args.save_plot:
        show.plot(predictions, classes, args.save_plot, show=args.plot)
    if cam_dir is not None:
        written = show.save_cams(predictions, classes, cam_dir, predictor.transform)
        print(f"Grad-CAM: {len(written)} images written to {cam_dir}", file=sys.stderr)
    return report_skipped(len(skipped), len(paths))


def main(argv: list[str] | None = None) -> int:
    """Run `predict.py`: 0 all predicted, 1 a user error (one line), 2 some images skipped."""
    args = parse_args(argv)
    sizes = f"predicting at --batch-size {args.batch_size}; lower it (or --image-size)"
    return run(lambda: predict(args), sizes, program=argv is None)
