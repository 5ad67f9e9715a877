"""The paper's result tables (docs/SPEC.md, published results) as data, and filling them with numbers measured here.

``paper_results.csv`` (beside this file) holds every published row: network, method, bits,
whether the downsampling convolutions are quantized, top-1 as published, and, for each released
N2UQ checkpoint, its download address and the file name this project expects under ``models/``.

A *measurement* is one evaluated checkpoint (or one training run of this project). A table puts
each measurement in the cell of its network × method × bits and shows published, measured and
the difference.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from n2uq.checkpoint import ModelConfig

__all__ = [
    "PaperRow",
    "Measurement",
    "TableRow",
    "load_paper_results",
    "cell_of",
    "build_table",
    "render_markdown",
    "render_csv",
    "ResultCache",
    "file_sha256",
    "BITS",
]

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
BITS = (2, 3, 4)
NETWORK_OF_ARCH = {
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
    "mobilenetv2": "MobileNet-V2",
}


@dataclass(frozen=True)
class PaperRow:
    """One published number (one cell of the paper's table)."""

    network: str
    method: str
    bits: int
    quantize_downsample: Optional[bool]
    top1: float
    checkpoint_file: str = ""
    checkpoint_url: str = ""


@dataclass
class Measurement:
    """A top-1 measured here, for one configuration."""

    config: ModelConfig
    top1: float
    top5: Optional[float] = None
    count: Optional[int] = None
    source: str = ""  # a checkpoint path or a run directory
    kind: str = "checkpoint"  # "checkpoint" | "trained here"
    preprocessing: str = ""  # how the images were prepared, e.g. "crop 224 after resize 256"

    def to_json(self) -> Dict:
        d = asdict(self)
        d["config"] = self.config.as_dict()
        return d

    @classmethod
    def from_json(cls, d: Dict) -> Measurement:
        d = dict(d)
        d["config"] = ModelConfig(**d["config"])
        return cls(**d)


@dataclass
class TableRow:
    """One row of the rendered table: network × method, cells for W2/A2, W3/A3, W4/A4."""

    network: str
    method: str
    published: Dict[int, Optional[float]] = field(default_factory=dict)
    measured: Dict[int, List[Measurement]] = field(default_factory=dict)
    released: Dict[int, PaperRow] = field(default_factory=dict)


def load_paper_results(path: Path = PAPER_RESULTS) -> List[PaperRow]:
    """Every row of the paper's published result tables, in the paper's order."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            qd = r["quantize_downsample"].strip()
            rows.append(
                PaperRow(
                    network=r["network"],
                    method=r["method"],
                    bits=int(r["bits"]),
                    quantize_downsample=None if qd == "" else qd == "1",
                    top1=float(r["top1"]),
                    checkpoint_file=r["checkpoint_file"],
                    checkpoint_url=r["checkpoint_url"],
                )
            )
    return rows


#: The paper's row name of each compared method (``--method``).
METHOD_ROWS = {"lsq": "LSQ", "pact": "PACT", "dorefa": "DoReFa-Net"}


def cell_of(config: ModelConfig) -> Tuple[str, str, int]:
    """``(network, method, bits)`` of the table cell a configuration belongs to.

    "N2UQ" quantizes every convolution but the first (quantized downsample); "N2UQ *" keeps the
    downsampling 1×1 convolutions in full precision. MobileNetV2 has only the "N2UQ *" row.
    """
    network = NETWORK_OF_ARCH.get(config.arch, config.arch)
    if config.method_tag != "n2uq":  # a compared method, or an ablation of N2UQ
        return network, METHOD_ROWS.get(config.method_tag, config.method_tag), config.n_bit
    if config.arch == "mobilenetv2":
        return network, "N2UQ *", config.n_bit
    return network, "N2UQ" if config.quantize_downsample else "N2UQ *", config.n_bit


#: Class count of the paper's data set (ImageNet): only such models are set beside the published numbers.
PAPER_CLASSES = 1000


def row_method(m: Measurement) -> str:
    """The row a measurement goes to: the paper's method row, or a row of its own for a run of this
    project ("(trained here)") or a model of another data set ("(10 classes)"), which are never
    compared with the published ImageNet number."""
    method = cell_of(m.config)[1]
    notes = ["trained here"] if m.kind != "checkpoint" else []
    if m.config.num_classes != PAPER_CLASSES:
        notes.append(f"{m.config.num_classes} classes")
    return f"{method} ({', '.join(notes)})" if notes else method


def build_table(paper: Iterable[PaperRow], measurements: Iterable[Measurement]) -> List[TableRow]:
    """Rows in the paper's order; measurements of configurations the paper lacks get rows at the end."""
    rows: Dict[Tuple[str, str], TableRow] = {}
    for p in paper:
        row = rows.setdefault((p.network, p.method), TableRow(p.network, p.method))
        row.published[p.bits] = p.top1
        if p.checkpoint_url:
            row.released[p.bits] = p
    for m in measurements:
        network, _, bits = cell_of(m.config)
        method = row_method(m)
        row = rows.setdefault((network, method), TableRow(network, method))
        row.measured.setdefault(bits, []).append(m)
    return list(rows.values())


def _best(ms: List[Measurement]) -> Measurement:
    return max(ms, key=lambda m: m.top1)


def _cell_text(row: TableRow, bits: int) -> str:
    published = row.published.get(bits)
    measured = row.measured.get(bits)
    if measured:
        best = _best(measured)
        if published is None:
            return f"{best.top1:.2f}"
        return f"{published:.1f} / {best.top1:.2f} ({best.top1 - published:+.2f})"
    if published is None:
        return "—"
    if bits in row.released:
        return f"{published:.1f} / no checkpoint"
    return f"{published:.1f}"


def _md(method: str) -> str:
    return method.replace("*", "\\*")


def render_markdown(table: List[TableRow], title: str = "ImageNet top-1 (%)") -> str:
    """The paper's layout; N2UQ cells read ``published / measured (difference)``."""
    lines = [
        f"### {title}",
        "",
        "Cells: `published / measured here (difference)`; `no checkpoint` where no file under the models",
        "folder has a released configuration. Runs of this project and models of other data sets (another",
        "class count) get rows of their own, with no published number beside them.",
        "",
        "| Network | Method | W2/A2 | W3/A3 | W4/A4 |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        bits_present = set(row.published) | set(row.measured)
        if row.network == "MobileNet-V2" and bits_present <= {4}:
            cells = ["—", "—", _cell_text(row, 4)]
        else:
            cells = [_cell_text(row, b) for b in BITS]
        lines.append(f"| {row.network} | {_md(row.method)} | " + " | ".join(cells) + " |")
    files = [(row, b, m) for row in table for b in sorted(row.measured) for m in row.measured[b]]
    if files:
        lines += ["", "Measured:", "", "| cell | top-1 | top-5 | images | preprocessing | source |",
                  "|---|---|---|---|---|---|"]
        for row, b, m in files:
            top5 = "" if m.top5 is None else f"{m.top5:.2f}"
            count = "" if m.count is None else str(m.count)
            prep = m.preprocessing or ("as in training" if m.kind != "checkpoint" else "")
            lines.append(f"| {row.network} {_md(row.method)} W{b}/A{b} | {m.top1:.2f} | {top5} | {count} | "
                         f"{prep} | `{m.source}` |")
    return "\n".join(lines) + "\n"


def render_csv(table: List[TableRow]) -> str:
    """One line per cell: network, method, bits, published, measured, difference, source."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["network", "method", "bits", "published_top1", "measured_top1", "difference", "measured_top5",
                "images", "source", "preprocessing"])
    for row in table:
        for b in BITS:
            published = row.published.get(b)
            measured = row.measured.get(b)
            if published is None and not measured:
                continue
            best = _best(measured) if measured else None
            w.writerow([
                row.network, row.method, b,
                "" if published is None else f"{published:.1f}",
                "" if best is None else f"{best.top1:.4f}",
                "" if best is None or published is None else f"{best.top1 - published:+.4f}",
                "" if best is None or best.top5 is None else f"{best.top5:.4f}",
                "" if best is None or best.count is None else best.count,
                "" if best is None else best.source,
                "" if best is None else best.preprocessing,
            ])
    return buf.getvalue()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ResultCache:
    """Evaluation results keyed by ``(checkpoint sha256, evaluation settings)``, in one JSON file.

    The settings key names the evaluation images and every flag that changes how a file is
    evaluated (``scripts/reproduce_tables.py``'s ``settings_key``).

    Written atomically, so an interrupted run never leaves a half-written cache.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.entries: Dict[str, Dict] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (json.JSONDecodeError, OSError):
                self.entries = {}  # a damaged cache only costs re-evaluation

    @staticmethod
    def key(sha256: str, settings: str) -> str:
        return f"{sha256}:{settings}"

    def get(self, sha256: str, settings: str) -> Optional[Measurement]:
        entry = self.entries.get(self.key(sha256, settings))
        return None if entry is None else Measurement.from_json(entry)

    def put(self, sha256: str, settings: str, measurement: Measurement) -> None:
        self.entries[self.key(sha256, settings)] = measurement.to_json()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
