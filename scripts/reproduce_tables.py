"""Reproduce the paper's ImageNet tables from checkpoints, in one command.

    python scripts/reproduce_tables.py --models models/ --data /path/to/imagenet
    torchrun --nproc_per_node=8 scripts/reproduce_tables.py --models models/ --data /path/to/imagenet

Every file under ``--models`` (any name, any depth) is read as a checkpoint, its configuration is
inferred from its contents, and it is evaluated on ``val/`` (strict load) under the crop, resize
and autocast its training recorded, as ``scripts/evaluate.py`` does, so the numbers are those
``scripts/evaluate.py`` prints for the same file. ``--image_size``/``--val_resize``/``--amp`` apply
to files that record none (the released checkpoints: 224/256/none by default); a flag that
contradicts what a file records refuses that file. A model of another data set (another class
count than ``val/`` has) is skipped with a line. Results are cached in ``<out>/cache.json``, keyed
by the file's SHA-256, the validation images and those flags, so a rerun evaluates only new files.
The table is written to ``<out>/tables.md`` and ``<out>/tables.csv`` and printed. ``--runs DIR``
also fills cells from this project's training runs (best val top-1 of each run's ``metrics.jsonl``)
that were validated on the same images (the data folder, classes and image count their checkpoint
and log record); other runs are skipped with a line. A full-precision file or run (``resnet/train.py
--full_precision``) has no cell in the paper's tables: it is skipped with a line (``scripts/evaluate.py``
measures it). ``--full_lr_thresholds`` models get a row of their own, as N2UQ's ablations do.

Exit status 1 when a file cannot be read, recognised or evaluated as asked (after evaluating the
others); each such file is named on its progress line as it comes and again at the end.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    from scripts.interrupt import exit_quietly_on_interrupt

    exit_quietly_on_interrupt()


from n2uq import data as D  # noqa: E402
from n2uq.checkpoint import (  # noqa: E402
    CheckpointError,
    ModelConfig,
    infer_config,
    load_state_dict_strict,
    read_state_and_meta,
)
from n2uq.cli import OneLineParser, UsageError, check_output_dir, run_main  # noqa: E402
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
from scripts.evaluate import (  # noqa: E402
    Settings,
    add_settings_flags,
    check_settings_flags,
    evaluation_settings,
)
from scripts.model_zoo import build_model, full_precision_resnet, training_args  # noqa: E402

#: Files under --models that are documentation or logs, not checkpoints.
NOT_CHECKPOINTS = {".md", ".txt", ".json", ".jsonl", ".csv", ".log", ".yaml", ".yml", ".sh", ".py", ".tmp"}


class NotTabulated(CheckpointError):
    """A readable model the tables have no cell for (a full-precision one); skipped with a line, not an error."""


class OtherDataError(NotTabulated):
    """The file or run is of another data set (its class count, classes or images differ); skipped."""


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="reproduce_tables.py", description="Fill the paper's tables with measured top-1.")
    p.add_argument("--models", default="models", help="folder searched (recursively) for checkpoints")
    p.add_argument("--data", required=True, help="ImageFolder root holding val/ (e.g. the ImageNet folder)")
    p.add_argument("--out", default="results", help="where tables.md, tables.csv and cache.json go")
    p.add_argument("--runs", default=None, help="also fill cells from training runs under this folder")
    p.add_argument("--batch_size", type=int, default=256,
                   help="global evaluation batch size (per process: divided by the processes, rounded up)")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader workers per process")
    add_settings_flags(p)
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


def data_fingerprint(val_dir: str) -> str:
    """Identity of the evaluation images: every file's path relative to ``val_dir`` and its size."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(val_dir):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(f"{os.path.relpath(path, val_dir)}:{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:16]


def settings_key(data: str, args) -> str:
    """Cache identity of an evaluation: the images, and the preprocessing and autocast flags.

    A file's evaluation settings are a function of its bytes (the SHA-256 the cache key starts
    with) and these flags (:func:`evaluation_settings`), so equal keys mean equal settings. The
    resolved settings are stored with each result and shown in the table."""
    return f"v3:{data}:crop={args.image_size}:resize={args.val_resize}:amp={args.amp}"


def read_for_evaluation(path: str, classes: List[str], args) -> Tuple[Dict[str, Any], ModelConfig, Settings]:
    """The file's state dict, configuration and evaluation settings, after every check that can refuse it."""
    state_dict, meta = read_state_and_meta(path)
    config = tabulated_config(state_dict, meta, path)
    if len(classes) != config.num_classes:
        raise OtherDataError(f"predicts {config.num_classes} classes, the validation data has {len(classes)}")
    if meta.get("classes") and list(meta["classes"]) != list(classes):
        raise CheckpointError("the validation class folders differ from the ones it was trained on")
    try:
        return state_dict, config, evaluation_settings(meta, args.image_size, args.val_resize, args.amp)
    except UsageError as exc:  # a flag that contradicts this file: refuse the file, not the run
        raise CheckpointError(str(exc)) from None


def evaluate_checkpoint(path: str, read: Tuple[Dict[str, Any], ModelConfig, Settings], dataset, env: DistEnv,
                        args) -> Measurement:
    """Strict load + top-1/top-5 on ``dataset``: what ``scripts/evaluate.py`` does for one file."""
    state_dict, config, settings = read
    model = build_model(config)
    load_state_dict_strict(model, state_dict, source=path)
    model.to(env.device)
    workers = default_workers(env) if args.workers is None else args.workers
    loader = D.build_val_loader(dataset, env.eval_batch(args.batch_size), env.rank, env.world_size, workers,
                                pin_memory=env.device.type == "cuda")
    result = evaluate(model, loader, env.device, settings.amp)
    return Measurement(config, result["top1"], result["top5"], int(result["count"]), path,
                       preprocessing=settings.describe())


def tabulated_config(state_dict: Dict[str, Any], meta: Dict[str, Any], path: str) -> ModelConfig:
    """The configuration of a quantized model; :class:`NotTabulated` for a full-precision ResNet (the
    paper's tables have no full-precision row; ``scripts/evaluate.py`` measures it), else
    :class:`CheckpointError` naming ``path``."""
    try:
        return infer_config(state_dict, meta)
    except CheckpointError as exc:
        config = meta.get("config")
        if (isinstance(config, dict) and config.get("full_precision")) or full_precision_resnet(state_dict):
            raise NotTabulated("a full-precision model: the paper's tables have no full-precision row "
                               "(scripts/evaluate.py measures it)") from None
        raise CheckpointError(f"{path}: {exc}") from None


def check_run_data(meta: Dict[str, Any], count: Optional[int], data: str, classes: List[str], images: int) -> None:
    """Refuse a run whose top-1 was not measured on ``data``'s val/ (``images`` images of ``classes``):
    :class:`OtherDataError` when its recorded data folder, classes or image count differ,
    :class:`CheckpointError` when it records no data folder or classes."""
    recorded = training_args(meta).get("data")
    if not isinstance(recorded, str) or not meta.get("classes"):
        raise CheckpointError("its checkpoint records no data folder or classes: cannot tell which images its "
                              "top-1 was measured on")
    if os.path.realpath(recorded) != os.path.realpath(data):
        raise OtherDataError(f"trained and validated on {recorded}, not on --data {data}")
    if list(meta["classes"]) != list(classes):
        raise OtherDataError(f"trained on other class folders than those of {data}/val")
    if count is not None and int(count) != images:
        raise OtherDataError(f"validated on {count} images, {data}/val holds {images}")


def run_measurements(runs_root: str, data: str, classes: List[str],
                     images: int) -> Tuple[List[Measurement], List[str], List[str]]:
    """Best val top-1 of every training run (a folder with ``metrics.jsonl``) under ``runs_root``,
    measured by the run itself under the preprocessing its checkpoint records, on ``data``'s val/
    (``images`` images of ``classes``); ``(measurements, errors, skipped)``: full-precision runs and
    runs validated on other images are skipped (:func:`check_run_data`), each with a line."""
    found, errors, skipped = [], [], []
    for dirpath, _, filenames in sorted(os.walk(runs_root)):
        if "metrics.jsonl" not in filenames:
            continue
        try:
            epochs = current_run_epochs(read_metrics(os.path.join(dirpath, "metrics.jsonl")))
        except (OSError, ValueError) as exc:
            errors.append(f"{dirpath}/metrics.jsonl: unreadable ({exc})")
            continue
        if not epochs:
            continue
        best = max(epochs, key=lambda r: r["val"]["top1"])
        try:
            config, meta = _run_config(dirpath)
            check_run_data(meta, best["val"].get("count"), data, classes, images)
        except NotTabulated as exc:
            skipped.append(f"{dirpath}: skipped: {exc}")
            continue
        except CheckpointError as exc:
            errors.append(f"{dirpath}: {exc}")
            continue
        found.append(Measurement(config, best["val"]["top1"], best["val"].get("top5"), best["val"].get("count"),
                                 dirpath, kind="trained here",
                                 preprocessing=evaluation_settings(meta).describe()))
    return found, errors, skipped


def current_run_epochs(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The validated epochs of the run the folder's checkpoint holds: those logged since its last
    fresh start (a ``start`` record that resumes nothing; an earlier run started over in the same
    folder may have had other settings), the last record of each epoch (a resumed run may log an
    epoch again)."""
    fresh = [i for i, r in enumerate(records) if r.get("event") == "start" and not r.get("resume")]
    since = records[fresh[-1]:] if fresh else records
    last: Dict[Any, Dict[str, Any]] = {}
    for r in since:
        if r.get("event") == "epoch" and r.get("val"):
            last[r.get("epoch")] = r
    return list(last.values())


def _run_config(run_dir: str) -> Tuple[ModelConfig, Dict[str, Any]]:
    """The configuration and entries of the run's first readable checkpoint (:func:`tabulated_config`)."""
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            try:
                state_dict, meta = read_state_and_meta(path)
            except CheckpointError:
                continue
            return tabulated_config(state_dict, meta, path), meta
    raise CheckpointError("cannot tell the run's configuration (no readable checkpoint.pth.tar)")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.models):
        raise UsageError(f"--models folder not found: {args.models} (download the released checkpoints into it; "
                         f"see models/README.md)")
    if args.runs is not None and not os.path.isdir(args.runs):
        raise UsageError(f"--runs folder not found: {args.runs}")
    check_settings_flags(args)
    check_output_dir(args.out, "--out")
    files = find_checkpoints(args.models)
    val_dir = os.path.join(args.data, "val")
    if not os.path.isdir(val_dir):
        raise D.DataError(f"no val/ folder in {args.data} (expected {val_dir}/<class>/<images>)")
    classes = sorted(e.name for e in os.scandir(val_dir) if e.is_dir())  # ImageFolder's class order

    cache = ResultCache(os.path.join(args.out, "cache.json"))
    key = settings_key(data_fingerprint(val_dir), args)
    env = init_distributed(args.device)
    measurements: List[Measurement] = []
    errors: List[str] = []
    other_data = not_tabulated = 0
    try:
        configure_threads(args.threads, env)
        datasets: Dict[Tuple[int, int], Any] = {}
        for i, path in enumerate(files, 1):
            where = f"[{i}/{len(files)}] {path}"
            try:
                digest = file_sha256(path)
                cached = None if args.no_cache else cache.get(digest, key)
                if cached is not None:
                    cached.source = path
                    measurements.append(cached)
                    _say(env, f"{where}: {cached.config.tag} top-1 {cached.top1:.2f}, {cached.preprocessing} (cached)")
                    continue
                read = read_for_evaluation(path, classes, args)
                settings = read[2]
                _say(env, f"{where}: {read[1].tag}, evaluating at {settings.describe()} ...")
                if (settings.image_size, settings.val_resize) not in datasets:
                    datasets[settings.image_size, settings.val_resize] = D.image_folder(
                        args.data, "val", D.val_transform(settings.image_size, settings.val_resize))
                m = evaluate_checkpoint(path, read, datasets[settings.image_size, settings.val_resize], env, args)
                _say(env, f"{where}: {m.config.tag} top-1 {m.top1:.2f} top-5 {m.top5:.2f} on {m.count} images, "
                          f"{m.preprocessing}")
                if env.is_main:
                    cache.put(digest, key, m)
                measurements.append(m)
            except OtherDataError as exc:
                other_data += 1
                _say(env, f"{where}: skipped: {exc} (a model of another data set)")
            except NotTabulated as exc:
                not_tabulated += 1
                _say(env, f"{where}: skipped: {exc}")
            except (CheckpointError, OSError) as exc:
                reason = f"cannot read ({exc.strerror or exc})" if isinstance(exc, OSError) else str(exc)
                errors.append(reason if path in reason else f"{path}: {reason}")
                _say(env, f"{where}: not evaluated: {reason.replace(path + ': ', '')}")
        if other_data and other_data + not_tabulated == len(files):
            errors.append(f"none of the {len(files)} files under {args.models} predicts the {len(classes)} classes "
                          f"of {val_dir}; check --data")
        if args.runs is not None:
            images = len(D.image_folder(args.data, "val", None))
            run_ms, run_errors, run_skips = run_measurements(args.runs, args.data, classes, images)
            measurements += run_ms
            errors += run_errors
            for line in run_skips:
                _say(env, line)
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
