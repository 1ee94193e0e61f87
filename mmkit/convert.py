"""python -m mmkit.convert SRC DST --to llava-hf|mmkit

Convert between mmkit directories, llava-hf directories (Llava / LlavaNext / LlavaOnevision,
loadable by transformers, vLLM and SGLang) and original-LLaVA directories (import only).
"""

from __future__ import annotations

import argparse
import sys

from mmkit.files import DirectoryNotEmpty, check_writable_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmkit.convert", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="mmkit, llava-hf or original-LLaVA directory (auto-detected)")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--to", required=True, choices=["llava-hf", "mmkit"], help="output layout")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a directory mmkit wrote (replaced only once the new one is complete)")
    args = p.parse_args(argv)

    # heavy (torch): after the arguments are parsed
    from mmkit.formats.llava_hf import written_by_mmkit
    from mmkit.formats.native import is_mmkit_dir

    ours = written_by_mmkit if args.to == "llava-hf" else is_mmkit_dir
    try:
        check_writable_dir(args.dst, ours, args.overwrite)  # before the (slow) load: never touch a user's folder
    except DirectoryNotEmpty as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # heavy (torch, transformers): after the arguments are parsed and the target checked
    import mmkit
    from mmkit.builder import DTYPES
    from mmkit.formats import UnknownLayoutError, detect_layout

    try:
        layout = detect_layout(args.src)
        model = mmkit.load(args.src)
    except (UnknownLayoutError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dtype:
        model.to(DTYPES[args.dtype])
        model.recipe.model.dtype = args.dtype
    try:
        out = model.save(args.dst, format=args.to, overwrite=args.overwrite)
    except (ValueError, DirectoryNotEmpty) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} ({layout}) -> {out} ({args.to}), {n:,} parameters, "
          f"dtype {next(model.parameters()).dtype}".replace("torch.", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
