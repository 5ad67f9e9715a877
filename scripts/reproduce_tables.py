"""Reproduce the paper's ImageNet tables from checkpoints, in one command.

    python scripts/reproduce_tables.py --models models/ --data /path/to/imagenet
    torchrun --nproc_per_node=8 scripts/reproduce_tables.py --models models/ --data /path/to/imagenet

Every file under ``--models`` (any name, any depth) is read as a checkpoint, its configuration is
inferred from its contents, and it is evaluated on ``val/`` (strict load; the numbers are those
``scripts/evaluate.py`` prints for the same file). Results are cached in ``<out>/cache.json``,
keyed by the file's SHA-256 and the validation data, so a rerun evaluates only new files. The
table is written to ``<out>/tables.md`` and ``<out>/tables.csv`` and printed. ``--runs DIR`` also
fills cells from this project's training runs (best val top-1 of each run's ``metrics.jsonl``).

Exit status 1 when a file cannot be read or recognised (after evaluating the others); every such
file is named.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from n2uq import data as D  # noqa: E402
from n2uq.checkpoint import CheckpointError, ModelConfig, load_model_state, load_state_dict_strict  # noqa: E402
from n2uq.cli import OneLineParser, UsageError, check_output_dir, check_ranges, run_main  # noqa: E402
from n2uq.distributed import DistEnv, cleanup, init_distributed  # noqa: E402
from n2uq.engine import configure_threads, default_workers, evaluate  # noqa: E402
from n2uq.metrics import read_metrics  # noqa: E402
from n2uq.tables import (  # noqa: E402,E501
    Measurement,
    ResultCache,
    build_table,
    file_sha256,
    load_paper_results,
    render_csv,
    render_markdown,
)
from scripts.model_zoo import build_model  # noqa: E402

#: Files under --models that are documentation or logs, not checkpoints.
NOT_CHECKPOINTS = {".md", ".txt", ".json", ".jsonl", ".csv", ".log", ".yaml", ".yml", ".sh", ".py", ".tmp"}


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="reproduce_tables.py", description="Fill the paper's tables with measured top-1.")
    p.add_argument("--models", default="models", help="folder searched (recursively) for checkpoints")
    p.add_argument("--data", required=True, help="ImageFolder root holding val/ (e.g. the ImageNet folder)")
    p.add_argument("--out", default="results", help="where tables.md, tables.csv and cache.json go")
    p.add_argument("--runs", default=None, help="also fill cells from training runs under this folder")
    p.add_argument("--batch_size", type=int, default=256, help="global evaluation batch size")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader workers per process")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--val_resize", type=int, default=256)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    p.add_argument("--no_cache", action="store_true", help="evaluate every file again")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def find_checkpoints(root: str) -> List[str]:
    """Every regular file under ``root`` except hidden files and documentation/log files."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() in NOT_CHECKPOINTS:
                continue
            if "tfevents" in name:
                continue
            found.append(os.path.join(dirpath, name))
    return found


def data_fingerprint(val_dir: str, image_size: int, val_resize: int) -> str:
    """Identity of the evaluation data: every image's relative path and size, plus the transform."""
    h = hashlib.sha256(f"{image_size}/{val_resize}".encode())
    for dirpath, dirnames, filenames in os.walk(val_dir):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(f"{os.path.relpath(path, val_dir)}:{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:16]


def evaluate_checkpoint(path: str, dataset, env: DistEnv, args) -> Measurement:
    """Strict load + top-1/top-5 on ``dataset``: what ``scripts/evaluate.py`` does for one file."""
    state_dict, config, _ = load_model_state(path)
    if len(dataset.classes) != config.num_classes:
        raise CheckpointError(f"{path}: predicts {config.num_classes} classes but the validation data has "
                              f"{len(dataset.classes)}")
    model = build_model(config)
    load_state_dict_strict(model, state_dict, source=path)
    model.to(env.device)
    workers = default_workers(env) if args.workers is None else args.workers
    loader = D.build_val_loader(dataset, args.batch_size // env.world_size, env.rank, env.world_size, workers,
                                pin_memory=env.device.type == "cuda")
    result = evaluate(model, loader, env.device)
    return Measurement(config, result["top1"], result["top5"], int(result["count"]), path)


def run_measurements(runs_root: str) -> Tuple[List[Measurement], List[str]]:
    """Best val top-1 of every training run (a folder with ``metrics.jsonl``) under ``runs_root``."""
    found, errors = [], []
    for dirpath, _, filenames in sorted(os.walk(runs_root)):
        if "metrics.jsonl" not in filenames:
            continue
        try:
            epochs = [r for r in read_metrics(os.path.join(dirpath, "metrics.jsonl"), "epoch") if r.get("val")]
        except (OSError, ValueError) as exc:
            errors.append(f"{dirpath}/metrics.jsonl: unreadable ({exc})")
            continue
        if not epochs:
            continue
        config = _run_config(dirpath)
        if config is None:
            errors.append(f"{dirpath}: cannot tell the run's configuration (no readable checkpoint.pth.tar)")
            continue
        best = max(epochs, key=lambda r: r["val"]["top1"])
        found.append(Measurement(config, best["val"]["top1"], best["val"].get("top5"), best["val"].get("count"),
                                 dirpath, kind="trained here"))
    return found, errors


def _run_config(run_dir: str) -> Optional[ModelConfig]:
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            try:
                return load_model_state(path)[1]
            except CheckpointError:
                continue
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.models):
        raise UsageError(f"--models folder not found: {args.models} (download the released checkpoints into it; "
                         f"see models/README.md)")
    if args.runs is not None and not os.path.isdir(args.runs):
        raise UsageError(f"--runs folder not found: {args.runs}")
    check_ranges({"--batch_size": args.batch_size, "--image_size": args.image_size, "--val_resize": args.val_resize},
                 {"--workers": args.workers, "--threads": args.threads})
    check_output_dir(args.out, "--out")
    files = find_checkpoints(args.models)
    val_dir = os.path.join(args.data, "val")
    if not os.path.isdir(val_dir):
        raise D.DataError(f"no val/ folder in {args.data} (expected {val_dir}/<class>/<images>)")

    cache = ResultCache(os.path.join(args.out, "cache.json"))
    fingerprint = data_fingerprint(val_dir, args.image_size, args.val_resize)
    env = init_distributed(args.device)
    measurements: List[Measurement] = []
    errors: List[str] = []
    dataset = None
    try:
        if args.batch_size % env.world_size:
            raise UsageError(f"--batch_size {args.batch_size} is not divisible by the {env.world_size} processes")
        configure_threads(args.threads, env)
        for i, path in enumerate(files, 1):
            try:
                digest = file_sha256(path)
                cached = None if args.no_cache else cache.get(digest, fingerprint)
                if cached is not None:
                    cached.source = path
                    measurements.append(cached)
                    _say(env, f"[{i}/{len(files)}] {path}: {cached.config.tag} top-1 {cached.top1:.2f} (cached)")
                    continue
                if dataset is None:
                    dataset = D.image_folder(args.data, "val", D.val_transform(args.image_size, args.val_resize))
                _say(env, f"[{i}/{len(files)}] {path}: evaluating ...")
                m = evaluate_checkpoint(path, dataset, env, args)
                _say(env, f"[{i}/{len(files)}] {path}: {m.config.tag} top-1 {m.top1:.2f} top-5 {m.top5:.2f} "
                          f"on {m.count} images")
                if env.is_main:
                    cache.put(digest, fingerprint, m)
                measurements.append(m)
            except CheckpointError as exc:
                errors.append(str(exc) if path in str(exc) else f"{path}: {exc}")
            except OSError as exc:
                errors.append(f"{path}: cannot read ({exc.strerror or exc})")
        if args.runs is not None:
            run_ms, run_errors = run_measurements(args.runs)
            measurements += run_ms
            errors += run_errors
    finally:
        cleanup()

    if env.is_main:
        table = build_table(load_paper_results(), measurements)
        markdown = render_markdown(table, f"Top-1 (%): published on ImageNet, measured here on {val_dir}")
        os.makedirs(args.out, exist_ok=True)
        for name, text in (("tables.md", markdown), ("tables.csv", render_csv(table))):
            tmp = os.path.join(args.out, name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, os.path.join(args.out, name))
        print("\n" + markdown)
        print(f"written: {os.path.join(args.out, 'tables.md')}, {os.path.join(args.out, 'tables.csv')}")
        if not files:
            print(f"note: no checkpoint files under {args.models}; see models/README.md for the download list")
    if errors:
        for e in errors:
            sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


def _say(env: DistEnv, line: str) -> None:
    if env.is_main:
        print(line, flush=True)


if __name__ == "__main__":
    run_main(main)
