"""Fetch the authors' full-precision initialisation files into ``models/`` with gdown.

    python scripts/download_pretrained.py                       # every file
    python scripts/download_pretrained.py --arch resnet18 --quantize_downsample 1

They are the starting point of the paper's training recipe (docs/SPEC.md, training recipe) and
what ``train.py --pretrained authors`` loads (it also fetches a missing file itself).
When a download fails (no network, Google Drive quota), the message names the file, where to
put it and the address to fetch it by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()


from n2uq.cli import OneLineParser, UsageError, check_output_dir, parse_bool, run_main  # noqa: E402
from n2uq.pretrained import AUTHORS_FILES, PretrainedError, fetch_authors_file  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="download_pretrained.py", description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted({a for a, _ in AUTHORS_FILES}), default=None,
                   help="only this architecture (default: all)")
    p.add_argument("--quantize_downsample", type=parse_bool, default=None,
                   help="only the file for this downsample kind (0/1; default: both)")
    p.add_argument("--models_dir", default="models", help="destination folder (default: models)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = p.parse_args(argv)
    if args.arch is not None and args.quantize_downsample is not None \
            and (args.arch, args.quantize_downsample) not in AUTHORS_FILES:
        raise UsageError(f"no released {args.arch} file has quantize_downsample={args.quantize_downsample} "
                         f"({args.arch} has no downsample choice); drop --quantize_downsample")
    check_output_dir(args.models_dir, "--models_dir")  # before any download
    wanted = [(a, qd) for a, qd in AUTHORS_FILES
              if (args.arch is None or a == args.arch)
              and (args.quantize_downsample is None or qd == args.quantize_downsample or a == "mobilenetv2")]
    failures = []
    for arch, qd in wanted:
        # MobileNetV2 has no downsample branch: its one file has no quantize_downsample to show
        kind = f"{arch:12s} " + ("(no downsample)" if arch == "mobilenetv2" else f"quantize_downsample={qd!s:5s}")
        try:
            path = fetch_authors_file(arch, qd, args.models_dir)
            print(f"ok      {kind} {path}")
        except PretrainedError as exc:
            failures.append(str(exc))
            print(f"FAILED  {kind} {exc}", file=sys.stderr)
    if failures:
        raise PretrainedError(f"{len(failures)} of {len(wanted)} file(s) could not be fetched (see above)")
    return 0


if __name__ == "__main__":
    run_main(main)
