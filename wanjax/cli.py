"""Command line: ``wanjax <subcommand> ...``.

One function per subcommand (``cmd_<name>(args) -> int``), registered in `build_parser`. Implemented: ``convert``.
"""
from __future__ import annotations

import argparse
import sys
import time

_DTYPES = ("bfloat16", "float32", "float16")


def cmd_convert(args: argparse.Namespace) -> int:
    """``wanjax convert SRC DST``: safetensors checkpoint (any supported layout) -> orbax cache directory."""
    import jax.numpy as jnp

    from wanjax.io.errors import CheckpointError
    from wanjax.io.orbax_cache import convert

    t0 = time.perf_counter()
    try:
        out = convert(args.src, args.dst, jnp.dtype(args.dtype), ignore_unknown=args.ignore_unknown,
                      overwrite=args.overwrite, compress=args.compress)
    except (CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"wanjax convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a DiT checkpoint (official / diffusers / ComfyUI safetensors) "
                                       "into a fast-loading orbax cache",
                       description=cmd_convert.__doc__)
    p.add_argument("src", help="expert dir, diffusers transformer dir, *.safetensors.index.json or .safetensors file")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES,
                   help="storage dtype of the large weights (modulation, norms, time embedding, head stay fp32)")
    p.add_argument("--ignore-unknown", action="store_true", help="skip tensors that are not DiT parameters")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--compress", action="store_true",
                   help="zstd-compress the arrays (smaller, slower to load on few cores)")
    p.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    """The ``wanjax`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="wanjax", description="Wan2.2-I2V-A14B in JAX/Flax with W4A4 quantization")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``wanjax`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
