"""``mpp convert``: convert weights between mpp, official MAE, timm and Hugging Face formats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mpp.formats.card import is_pretraining_run, model_card
from mpp.formats.detect import FORMATS
from mpp.formats.export import TARGETS, export_model
from mpp.formats.load import load_checkpoint

EPILOG = """\
source formats (detected; force one with --from):
  official  facebookresearch/mae .pth files, {'model': state_dict}: mae_pretrain_vit_{base,large,huge}.pth (encoder),
            mae_pretrain_vit_*_full.pth and mae_visualize_vit_*.pth (with decoder), and checkpoint-*.pth of its
            training script
  timm      a timm VisionTransformer state dict (.pth/.bin/.safetensors, e.g. vit_base_patch16_224.mae), or a timm
            hub directory (config.json with "architecture" + model.safetensors)
  hf        a Hugging Face ViTMAEForPreTraining / ViTMAEModel directory (config.json + model.safetensors or
            pytorch_model.bin), e.g. a local copy of facebook/vit-mae-base
  mpp       encoder.safetensors / mae.safetensors (or a directory holding them), or an mpp training checkpoint

targets (--to):
  mpp       DST/encoder.safetensors (+ encoder.json) and, when the source has a decoder, DST/mae.safetensors to
            continue pretraining; metadata: mpp version, variant, image/patch size, channels, pooling, mean/std,
            norm-pix
  timm      DST/model.safetensors + DST/config.json (timm.create_model("local-dir:DST", pretrained=True)); a DST
            ending in .safetensors/.pth/.bin gets the file and a .json beside it holding the timm kwargs
  hf        DST/config.json + DST/model.safetensors (transformers.ViTMAEForPreTraining.from_pretrained(DST), or
            ViTMAEModel for an encoder)

Files without a config (official, timm) have their architecture read off tensor shapes. Attention heads cannot be
seen in shapes: the standard ViT heads are assumed (192->3, 384->6, 768->12, 1024->16, 1280->16, else width/64;
decoder 512->16, else width/32); set them with --num-heads / --decoder-num-heads when that is wrong.
Pickled files are read with torch.load(weights_only=True): a file that would run code is refused.

examples:
  mpp convert mae_pretrain_vit_base.pth out/ --to mpp
  mpp convert mae_pretrain_vit_base_full.pth out/ --to mpp --norm-pix-loss
  mpp convert out/encoder.safetensors timm_out/ --to timm
  mpp convert vit-mae-base/ out/ --to mpp
  mpp convert runs/fm hub/ --to hf          # from a pretraining run: also hub/README.md, a model card

From a pretraining run directory the export comes with a model card (README.md: settings, the run's evaluation
results, a reconstruction picture, how to load it); `mpp push DIR OWNER/NAME` uploads such a folder to the Hub.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``mpp convert`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mpp convert",
        description=__doc__.split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="checkpoint file or directory")
    parser.add_argument("dst", help="output directory (or file for --to timm)")
    parser.add_argument("--to", choices=TARGETS, default="mpp", help="target format (default: mpp)")
    parser.add_argument("--from", dest="fmt", choices=FORMATS, help="source format (default: detected)")
    parser.add_argument("--num-heads", type=int, help="encoder attention heads (files without a config)")
    parser.add_argument("--decoder-num-heads", type=int, help="decoder attention heads (files without a config)")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="N", help="image size H [W] of a non-square grid")
    parser.add_argument("--norm-pix-loss", action="store_true", help="mark the model as trained on norm-pix targets")
    parser.add_argument("--encoder-only", action="store_true", help="drop the decoder")
    parser.add_argument("--mean", type=float, nargs="+", help="per-channel normalisation mean to record")
    parser.add_argument("--std", type=float, nargs="+", help="per-channel normalisation std to record")
    parser.add_argument("--pth", action="store_true", help="--to timm: write a pickle instead of safetensors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Convert ``SRC`` to ``DST``; prints what was detected, assumed and written."""
    args = build_parser().parse_args(argv)
    overrides = {
        key: value
        for key, value in (
            ("num_heads", args.num_heads),
            ("decoder_num_heads", args.decoder_num_heads),
            ("img_size", (args.img_size * 2)[:2] if args.img_size else None),
            ("norm_pix_loss", True if args.norm_pix_loss else None),
        )
        if value is not None
    }
    try:
        model, info = load_checkpoint(args.src, fmt=args.fmt, encoder_only=args.encoder_only, **overrides)
        metadata = dict(info.metadata, source=f"{info.format}:{Path(info.path).name}")
        if args.mean is not None or args.std is not None:
            if args.mean is None or args.std is None or len(args.mean) != len(args.std):
                raise ValueError("--mean and --std must be given together, with one value per channel each")
            metadata.update(mean=args.mean, std=args.std)
        written = export_model(model, args.dst, args.to, metadata, pth=args.pth)
        if is_pretraining_run(args.src) and not Path(args.dst).suffix:  # a folder to share: say what is in it
            written.append(model_card(args.src, args.dst, args.to))
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"mpp convert: error: {err}", file=sys.stderr)
        return 2  # bad input, as every other command
    kind = "masked autoencoder (with decoder)" if info.has_decoder else "encoder"
    print(f"read {info.path}: {info.format} format, {kind}")
    print(f"config: {json.dumps(info.config)}")
    for note in info.notes:
        print(f"note: {note}")
    for path in written:
        print(f"wrote {path}")
    return 0
