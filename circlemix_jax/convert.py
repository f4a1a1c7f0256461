"""Converts ImageNet EfficientNet-B0 weights (timm, torchvision, efficientnet_pytorch, Keras) for our Flax model.

    python -m circlemix_jax.convert --source timm --input model.safetensors --arch efficientnet_b0 --output DIR

DIR then holds `variables/` and `meta.json`. `circlemix_jax.convert.load(DIR)`
rebuilds the model whose logits equal the source model's; train from it with
`--config.model.init_from=DIR`. The work is done in `circlemix_jax.weights`;
this module is the command line and the names users call.
"""

from __future__ import annotations

import argparse
import sys

from circlemix_jax.errors import exits_cleanly
from circlemix_jax.weights import sources as ws
from circlemix_jax.weights.conversion import convert, map_tensors
from circlemix_jax.weights.folder import META_FILE, init_backbone, load, load_backbone, override_config, read_meta

__all__ = ["META_FILE", "convert", "init_backbone", "load", "load_backbone", "map_tensors", "override_config",
           "read_meta"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m circlemix_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, choices=ws.SOURCES)
    p.add_argument("--input", required=True, help=".safetensors / .pth / .bin (torch sources) or .h5 (keras)")
    p.add_argument("--arch", choices=ws.TIMM_ARCHS, default=None,
                   help="timm only; read from a config.json beside the file when present")
    p.add_argument("--output", required=True, help="folder for variables/ and meta.json")
    p.add_argument("--force", action="store_true", help="replace an earlier conversion in --output")
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    """CLI entry: bad input ends in one `error: ...` line and exit code 2."""
    args = parse_args(argv)
    convert(args.source, args.input, args.output, arch=args.arch, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
