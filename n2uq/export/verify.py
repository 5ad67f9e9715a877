"""Agreement checks between the fake-quant model, the integer model and the exported files.

Codes are compared *layer by layer*: the model under test runs with every quantizer's output
replaced by the reference's codes (teacher forcing), so each quantizer sees the reference's inputs
and a mismatch can only come from that quantizer. A quantized network is discontinuous: run end to
end, one code that flips because two float computations of the same value round differently
changes the next layer's inputs and can cascade (the fake-quant model disagrees with itself in
float64 in the same way). So the per-layer comparison is the exactness check, and the end-to-end
numbers are reported beside it.

"Within float rounding of a threshold": the value a quantizer compares (``scale1·x`` for an LTQ,
``u`` for a threshold unit) is also computed in float64 from the same codes; the largest
float32-vs-float64 difference over the layer is that layer's rounding size ``r``. A mismatched
element whose value lies within ``2r`` of a threshold (both computations of the value may be off
by up to ``r``) is a rounding flip; any other mismatch is an error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from n2uq.export.graph import QuantizerTrace, run_graph, trace_graph
from n2uq.export.integer_model import IntegerModel, UnitRecord

__all__ = ["CodeAgreement", "LogitAgreement", "Agreement", "FastAgreement", "compare_codes", "compare_logits",
           "check_fast",
           "fake_quant_trace", "check_against_fake_quant", "check_against_runtime"]

#: Floor of the rounding tolerance, relative to the layer's largest magnitude.
MIN_REL_TOL = 1e-7


@dataclass
class CodeAgreement:
    elements: int = 0
    mismatched: int = 0
    near_threshold: int = 0
    per_unit: Dict[str, int] = field(default_factory=dict)  # mismatches per unit (non-zero only)

    @property
    def far(self) -> int:
        """Mismatches not explained by float rounding (must be 0)."""
        return self.mismatched - self.near_threshold

    @property
    def fraction(self) -> float:
        return self.mismatched / max(self.elements, 1)

    def ok(self, max_fraction: float = 1e-4) -> bool:
        return self.far == 0 and self.fraction < max_fraction

    def __str__(self) -> str:
        return (f"{self.elements - self.mismatched}/{self.elements} codes equal; {self.mismatched} differ "
                f"({self.fraction:.2e}), {self.near_threshold} of them within float rounding of a threshold")


@dataclass
class LogitAgreement:
    max_abs_diff: float
    scale: float  # max |reference logit|
    top1_same: int
    samples: int

    @property
    def rel(self) -> float:
        return self.max_abs_diff / max(self.scale, 1e-12)

    def ok(self, rel_tol: float = 1e-4) -> bool:
        return self.rel <= rel_tol and self.top1_same == self.samples

    def __str__(self) -> str:
        return (f"logits max |diff| {self.max_abs_diff:.3e} = {self.rel:.2e} of the logit scale "
                f"{self.scale:.3g}; top-1 same for {self.top1_same}/{self.samples}")


def compare_logits(out: Tensor, ref: Tensor) -> LogitAgreement:
    out, ref = out.detach().float(), ref.detach().float()
    return LogitAgreement(float((out - ref).abs().max()), float(ref.abs().max()),
                          int((out.argmax(1) == ref.argmax(1)).sum()), int(ref.shape[0]))


def rounding_tolerance(values: Tensor, values64: Tensor) -> float:
    """``2·max|values − values64|`` (the layer's float32 rounding, both sides), at least
    ``MIN_REL_TOL`` of the largest magnitude."""
    scale = float(values.abs().max()) if values.numel() else 0.0
    return max(2.0 * float((values.double() - values64.double()).abs().max()), MIN_REL_TOL * scale)


def _near(values: Tensor, boundaries: Tensor, mask: Tensor, tol: float) -> Tensor:
    """For the elements of ``values [N, C, ...]`` selected by ``mask``: within ``tol`` of one of
    ``boundaries`` (``[n]`` shared or ``[C, n]`` per channel; non-finite entries never near)."""
    picked = values[mask].double()
    b = boundaries.double()
    b = b.expand(len(picked), -1) if b.dim() == 1 else b[mask.nonzero()[:, 1]]
    dist = (picked.unsqueeze(-1) - b).abs().nan_to_num(float("inf"), float("inf"), float("inf")).amin(-1)
    return dist <= tol


def compare_codes(codes: Mapping[str, Tensor], ref: Mapping[str, Tensor], values: Mapping[str, Tensor],
                  boundaries: Mapping[str, Tensor], tolerances: Mapping[str, float]) -> CodeAgreement:
    """Element-wise code agreement over every unit in ``ref``; a mismatch counts as near a threshold
    when ``values[unit]`` lies within ``tolerances[unit]`` of ``boundaries[unit]``."""
    agg = CodeAgreement()
    for name, r in ref.items():
        if name not in codes:
            raise KeyError(f"no codes for quantizer {name!r} in the model under test")
        diff = codes[name].to(r.dtype).reshape(r.shape) != r
        agg.elements += r.numel()
        count = int(diff.sum())
        if count:
            agg.mismatched += count
            agg.per_unit[name] = count
            agg.near_threshold += int(_near(values[name], boundaries[name], diff, tolerances[name]).sum())
    return agg


def fake_quant_trace(model: nn.Module, x: Tensor) -> Tuple[Tensor, Dict[str, QuantizerTrace]]:
    """Fake-quant logits and every quantizer's trace; checks the graph walk equals ``model(x)``."""
    record: Dict[str, QuantizerTrace] = {}
    logits = run_graph(trace_graph(model), x, record)
    with torch.no_grad():
        direct = model(x)
    diff = float((direct - logits).abs().max())
    if diff > 1e-5 * float(direct.abs().max()) + 1e-6:
        raise RuntimeError(f"the module-by-module walk of the model does not reproduce model(x) (max |diff| "
                           f"{diff:.3g}): its layout is not one of the supported N2UQ ResNet/MobileNetV2 "
                           "layouts or its forward is not faithful")
    return direct, record


@dataclass
class Agreement:
    """Codes and logits, layer by layer (teacher-forced) and end to end."""

    codes: CodeAgreement
    logits: LogitAgreement
    end_to_end_codes: CodeAgreement
    end_to_end_logits: LogitAgreement
    #: The fake-quant model in float64 vs float32, end to end: how far float rounding alone moves it.
    yardstick: Optional[Tuple[CodeAgreement, LogitAgreement]] = None

    def ok(self) -> bool:
        return self.codes.ok() and self.logits.ok()

    def lines(self) -> List[str]:
        out = [f"per layer:  {self.codes}", f"            {self.logits}",
               f"end to end: {self.end_to_end_codes}", f"            {self.end_to_end_logits}"]
        if self.yardstick is not None:
            out += [f"(yardstick: fake-quant float64 vs float32, end to end: {self.yardstick[0]}",
                    f"            {self.yardstick[1]})"]
        return out


def _run(int_model: IntegerModel, x: Tensor, override: Optional[Dict[str, Tensor]] = None):
    record: Dict[str, UnitRecord] = {}
    out = int_model.run(x, record=record, override=override)
    return out, record


def check_against_fake_quant(model: nn.Module, int_model: IntegerModel, x: Tensor,
                             yardstick: bool = False) -> Agreement:
    """Integer model vs the fake-quant model on ``x`` (rounding judged on the fake-quant side).

    ``yardstick`` also compares the fake-quant model in float64 with itself in float32, end to end.
    """
    ref_logits, trace = fake_quant_trace(model, x)
    ref = {k: t.codes for k, t in trace.items()}
    xs = {k: t.xs for k, t in trace.items()}
    bounds = {k: t.boundaries for k, t in trace.items()}
    graph64 = trace_graph(copy.deepcopy(model).double())
    forced64: Dict[str, QuantizerTrace] = {}
    run_graph(graph64, x.double(), forced64, override=ref)
    tols = {k: rounding_tolerance(xs[k], forced64[k].xs) for k in ref}

    tf_out, tf_rec = _run(int_model, x, ref)
    e2e_out, e2e_rec = _run(int_model, x)
    extra = None
    if yardstick:
        free64: Dict[str, QuantizerTrace] = {}
        logits64 = run_graph(graph64, x.double(), free64)
        extra = (compare_codes({k: t.codes for k, t in free64.items()}, ref, xs, bounds, tols),
                 compare_logits(logits64, ref_logits))
    return Agreement(
        compare_codes({k: r.codes for k, r in tf_rec.items()}, ref, xs, bounds, tols),
        compare_logits(tf_out, ref_logits),
        compare_codes({k: r.codes for k, r in e2e_rec.items()}, ref, xs, bounds, tols),
        compare_logits(e2e_out, ref_logits), extra)


def check_against_runtime(int_model: IntegerModel, x: Tensor, runtime_logits: Tensor,
                          runtime_codes: Mapping[str, Tensor]) -> Agreement:
    """Integer model vs an exported file's outputs (codes of every unit and logits) on ``x``.

    Rounding is judged on the integer model's side (its value ``u`` against its thresholds; the
    rounding size from the same model run in float64).
    """
    ref = {k: torch.as_tensor(v).to(torch.int64) for k, v in runtime_codes.items()}
    forced = {k: v.float() for k, v in ref.items()}
    units = {u.name: u for u in int_model.units()}
    tf_out, tf_rec = _run(int_model, x, forced)
    _, rec64 = _run(copy.deepcopy(int_model).double(), x.double(), forced)
    u = {k: r.u for k, r in tf_rec.items()}
    tols = {k: rounding_tolerance(u[k], rec64[k].u) for k in ref}
    bounds = {k: units[k].thresholds for k in ref}
    e2e_out, e2e_rec = _run(int_model, x)
    runtime_logits = torch.as_tensor(runtime_logits)
    return Agreement(
        compare_codes({k: r.codes for k, r in tf_rec.items()}, ref, u, bounds, tols),
        compare_logits(tf_out, runtime_logits),
        compare_codes({k: r.codes for k, r in e2e_rec.items()}, ref, {k: r.u for k, r in e2e_rec.items()},
                      bounds, tols),
        compare_logits(e2e_out, runtime_logits))


@dataclass
class FastAgreement:
    """The fast (QDQ) export against the integer model on one batch.

    ``exact_codes``: units reading an accumulator (the fast graph resolves every threshold on it
    exactly); teacher-forced, every one of their codes must equal the integer model's.
    ``other_codes``: the rest (units reading a float tensor, whose value the fast graph computes
    after an 8-bit residual conv, or with onnxruntime's float rounding), reported.
    ``requantized``: convs the file runs through 8 bits (``--fast_residual int8``); with any, the file
    is *approximate*: its codes and predictions may differ from the PyTorch model's end to end, by
    an amount the check batch only samples. ``fake_quant``: the file's logits against the PyTorch
    fake-quant model's, end to end (when given)."""

    exact_codes: CodeAgreement
    other_codes: CodeAgreement
    end_to_end_codes: CodeAgreement
    logits: LogitAgreement
    requantized: int = 0
    fake_quant: Optional[LogitAgreement] = None

    def ok(self) -> bool:
        """The exact parts agree (codes of units reading an accumulator); says nothing of the lossy part."""
        return self.exact_codes.mismatched == 0

    @property
    def approximate(self) -> bool:
        return self.requantized > 0

    def status(self) -> str:
        """``FAILED`` (an exact part disagrees), ``APPROXIMATE (...)`` (a lossy file, with its end-to-end
        agreement on the batch), or ``OK``."""
        if not self.ok():
            return "FAILED"
        if self.approximate:
            return (f"APPROXIMATE ({self.requantized} residual-stream convs requantized to 8 bits; end to end on "
                    f"the check batch: {self.end_to_end()})")
        return "OK"

    def end_to_end(self) -> str:
        """The file's end-to-end agreement on the batch: same top-1, largest logit difference relative
        to the logits' scale, share of codes that differ."""
        ref, name = (self.fake_quant, "PyTorch fake-quant") if self.fake_quant else (self.logits, "integer model")
        return (f"top-1 same as the {name} model on {ref.top1_same}/{ref.samples} check images "
                f"({100.0 * ref.top1_same / max(ref.samples, 1):.0f}%), logits max |diff| {100.0 * ref.rel:.3g}% of "
                f"their scale, {100.0 * self.end_to_end_codes.fraction:.3g}% of the codes differ from the integer "
                f"model's")

    def lines(self) -> List[str]:
        return [f"units computed exactly (teacher-forced): {self.exact_codes}",
                f"units reading a float tensor (teacher-forced): {self.other_codes}",
                f"end to end: {self.end_to_end_codes}", f"            {self.logits}"]


def check_fast(int_model: IntegerModel, x: Tensor, runtime_logits: Tensor, runtime_codes: Mapping[str, Tensor],
               exact_units: List[str], requantized: int = 0,
               fake_quant_logits: Optional[Tensor] = None) -> FastAgreement:
    """Codes of the fast export (``runtime_codes``, one entry per unit) against the integer model's:
    teacher-forced (each unit of the integer model sees the fast graph's codes upstream) and end
    to end; ``exact_units`` (the units reading an accumulator) must match code for code.
    ``requantized``: the file's convs requantized to 8 bits (it is approximate when > 0);
    ``fake_quant_logits``: the PyTorch model's logits on ``x``, compared end to end."""
    ref = {k: torch.as_tensor(v).to(torch.int64) for k, v in runtime_codes.items()}
    _, tf_rec = _run(int_model, x, {k: v.float() for k, v in ref.items()})
    e2e_out, e2e_rec = _run(int_model, x)
    exact, other = CodeAgreement(), CodeAgreement()
    for name, codes in ref.items():
        agg = exact if name in exact_units else other
        diff = int((tf_rec[name].codes.to(torch.int64) != codes).sum())
        agg.elements += codes.numel()
        agg.mismatched += diff
        if diff:
            agg.per_unit[name] = diff
    e2e = CodeAgreement()
    for name, codes in ref.items():
        diff = int((e2e_rec[name].codes.to(torch.int64) != codes).sum())
        e2e.elements += codes.numel()
        e2e.mismatched += diff
    runtime_logits = torch.as_tensor(runtime_logits)
    vs_fq = None if fake_quant_logits is None else compare_logits(runtime_logits, fake_quant_logits)
    return FastAgreement(exact, other, e2e, compare_logits(runtime_logits, e2e_out), requantized, vs_fq)
