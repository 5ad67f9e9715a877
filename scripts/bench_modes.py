"""What ``scripts/benchmark.py`` measures: the quantizer, a training step and GPU throughput.

* :func:`quantizer_mode` — forward+backward of ``n2uq.LTQ`` (the module users import: the fast
  operator), of its definition (``n2uq.quant.LTQ``) and of the specification's literal form
  (``tests/spec_forms.py``), each against ``nn.ReLU``;
* :func:`step_mode` — one training step of N2UQ ResNet-18 students against full-precision
  ResNet-18, teacher off and on, with the activation memory each keeps for backward;
* :func:`gpu_mode` — training and eval images/s on CUDA, fp32 and bf16 + channels_last, with the
  N2UQ kernels on and off.

Each mode takes the parsed command line (``args``) and the device, and prints its table. Like the
measurement helpers in ``scripts/bench_measure.py``, this stays out of the installed package: it
builds the repository's ``resnet/`` models and the specification's forms of ``tests/spec_forms.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from n2uq import LTQ
from n2uq import quant as definitions
from n2uq.kernels import get_backend, select, use_backend
from n2uq.kernels.ltq_state import ltq_state
from n2uq.losses import kd_loss
from resnet.resnet import resnet18
from scripts.bench_measure import SavedTensors, interleaved, median_ms, min_ms
from tests.spec_forms import spec_ltq

__all__ = ["quantizer_mode", "step_mode", "gpu_mode", "make_step", "saved_activation_bytes"]

# ---------------------------------------------------------------------------------------------
# Quantizer
# ---------------------------------------------------------------------------------------------


def _trained_like_ltq(n_bit: int, device: torch.device) -> LTQ:
    """An LTQ with unequal intervals (one below eps), so every code path is exercised."""
    q = LTQ(n_bit)
    with torch.no_grad():
        g = torch.Generator().manual_seed(n_bit)
        q.start.fill_(-0.1)
        q.a.copy_(torch.rand(q.n_val, generator=g) * 1.5 * q.interval + 0.25 * q.interval)
        if q.n_val >= 3:
            q.a[1] = 5e-4
        q.scale1.fill_(1.1)
        q.scale2.fill_(0.9)
    return q.to(device)


def _ratio(value: float, width: int, digits: int) -> str:
    """``value`` as ``<value>x`` right-aligned in ``width`` characters, or ``—`` where it was not measured."""
    text = "—" if math.isnan(value) else f"{value:.{digits}f}x"
    return f"{text:>{width}}"


def quantizer_mode(args: argparse.Namespace, device: torch.device) -> None:
    """``n2uq.LTQ`` vs ReLU (and its definition, and the spec form) forward+backward at each of ``args.bits``."""
    shape = tuple(args.shape)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(shape, generator=g) * 0.8 + 0.5).to(device).requires_grad_(True)
    upstream = torch.randn(shape, generator=g).to(device)
    in_bytes = x.numel() * x.element_size()
    relu = nn.ReLU()
    if device.type != "cpu" and not args.skip_reference:
        print("(the spec form of tests/spec_forms.py is written for CPU tensors: column skipped)")
        args.skip_reference = True

    def fwd_bwd(forward: Callable[[Tensor], Tensor], params: List[Tensor]) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.grad(forward(x), [x, *params], upstream)
        return run

    def saved_per_input(forward: Callable[[Tensor], Tensor]) -> float:
        with SavedTensors() as saved:
            y = forward(x)
            alive = saved.alive
        del y
        return alive / in_bytes

    print(f"\n== quantizer: tensor {list(shape)} float32 on {device}, {args.rounds} interleaved rounds, "
          f"kernels={get_backend()}, threads={torch.get_num_threads()}")
    print("LTQ: n2uq.LTQ, the module users import; def: its definition n2uq.quant.LTQ (LTQFunction); spec: "
          "the specification's loop form (tests/spec_forms.py)")
    print("times: median over rounds (ratio of medians) and, in brackets, the ratio of the fastest rounds")
    header = f"{'bits':>4} | {'ReLU ms':>8} | {'LTQ ms':>8} | {'LTQ/ReLU':>15} | {'def/ReLU':>8} | {'spec/ReLU':>9} |" \
             f" {'saved/in LTQ':>12} | {'saved/in def':>12} | {'saved/in spec':>13}"
    print(header)
    print("-" * len(header))
    for n_bit in args.bits:
        q = _trained_like_ltq(n_bit, device)
        params = [q.start, q.a, q.scale1, q.scale2]
        definition = definitions.LTQ(n_bit).to(device)
        definition.load_state_dict(q.state_dict())
        def_params = [definition.start, definition.a, definition.scale1, definition.scale2]
        spec_params = [p.detach().clone().requires_grad_(True) for p in params]

        def spec(t: Tensor, spec_params=spec_params) -> Tensor:
            return spec_ltq(t, *spec_params)

        # LTQ and ReLU are interleaved on their own: the slower forms allocate many input-sized
        # temporaries per call, and the allocator churn they leave (pages returned to and faulted
        # back from the OS) would land at random in the timing of whatever runs next.
        times = interleaved({"relu": fwd_bwd(relu, []), "ltq": fwd_bwd(q, params)}, args.rounds, args.warmup,
                            device)
        relu_ms, ltq_ms = median_ms(times["relu"]), median_ms(times["ltq"])
        best = min_ms(times["ltq"]) / min_ms(times["relu"])
        ratios = {"def": float("nan"), "spec": float("nan")}
        saved = {"def": float("nan"), "spec": float("nan")}
        slow_forms = {"def": (definition, def_params)}
        if not args.skip_reference:
            slow_forms["spec"] = (spec, spec_params)
        for key, (form, form_params) in slow_forms.items():  # each against ReLU, fewer rounds (slower)
            slow_times = interleaved({"relu": fwd_bwd(relu, []), key: fwd_bwd(form, form_params)},
                                     max(3, args.rounds // 4), 1, device)
            ratios[key] = median_ms(slow_times[key]) / median_ms(slow_times["relu"])
            saved[key] = saved_per_input(form)
        print(f"{n_bit:>4} | {relu_ms:8.2f} | {ltq_ms:8.2f} | {ltq_ms / relu_ms:5.2f}x [{best:5.2f}x] |"
              f" {_ratio(ratios['def'], 8, 1)} | {_ratio(ratios['spec'], 9, 1)} | {saved_per_input(q):11.2f}x |"
              f" {_ratio(saved['def'], 12, 2)} | {_ratio(saved['spec'], 13, 2)}")
    if args.breakdown:
        for n_bit in args.bits:
            _breakdown(_trained_like_ltq(n_bit, device), x.detach(), upstream, args, device)


def _breakdown(q: LTQ, x: Tensor, upstream: Tensor, args: argparse.Namespace, device: torch.device) -> None:
    """Where LTQ's time goes against ReLU's: the kernels alone (forward; backward with G-STE's sums)
    and the per-call cost (forward+backward of a 1×1×4×4 tensor: Python, autograd, the LTQ state and
    the parameter gradients), interleaved in one run."""
    impl = select.implementation(x, x.dtype, n_thresholds=q.n_val)
    state = ltq_state(q.start, q.a, q.scale2, q.eps, q.levels, x.dtype)
    s1, s2 = q.scale1.detach(), q.scale2.detach()
    relu_y = torch.relu(x)
    tiny = torch.randn(1, 1, 4, 4, device=device).requires_grad_(True)
    ones = torch.ones_like(tiny)
    params = [q.start, q.a, q.scale1, q.scale2]
    fns = {
        "relu_fwd": lambda: torch.relu(x),
        "ltq_fwd": lambda: impl.ltq_forward(x, None, s1, state.thresholds, state.table, False),
        "relu_bwd": lambda: torch.ops.aten.threshold_backward(upstream, relu_y, 0.0),
        "ltq_bwd": lambda: impl.ltq_backward(x, upstream, None, s1, s2, state.thresholds, state.levels,
                                             state.breakpoints, state.slope),
        "relu_call": lambda: torch.autograd.grad(torch.relu(tiny), [tiny], ones),
        "ltq_call": lambda: torch.autograd.grad(q(tiny), [tiny, *params], ones),
    }
    t = {name: median_ms(v) for name, v in interleaved(fns, args.rounds, args.warmup, device).items()}
    print(f"{q.n_bit} bits, {impl.__name__.rsplit('.', 1)[-1]} kernels: forward {t['ltq_fwd']:.2f} ms vs ReLU "
          f"{t['relu_fwd']:.2f} ms ({t['ltq_fwd'] / t['relu_fwd']:.2f}x), backward {t['ltq_bwd']:.2f} ms vs ReLU's "
          f"{t['relu_bwd']:.2f} ms ({t['ltq_bwd'] / t['relu_bwd']:.2f}x); per call (1x1x4x4 fwd+bwd) "
          f"{1e3 * t['ltq_call']:.0f} us vs ReLU {1e3 * t['relu_call']:.0f} us")


# ---------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------


def make_step(model: nn.Module, teacher: Optional[nn.Module], images: Tensor, labels: Tensor,
              amp_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """One training step: forward (and teacher forward), loss, backward, Adam step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    device_type = images.device.type

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images)
            if teacher is None:
                loss = F.cross_entropy(logits.float(), labels)
            else:
                with torch.no_grad():
                    target = teacher(images)
                loss = kd_loss(logits.float(), target.float())
        loss.backward()
        optimizer.step()

    return step


def _students(bits: List[int]) -> Dict[str, Callable[[], nn.Module]]:
    builders: Dict[str, Callable[[], nn.Module]] = {"fp": lambda: torchvision.models.resnet18()}
    for b in bits:
        builders[f"w{b}a{b}"] = lambda b=b: resnet18(b, False, 1000)
    return builders


def saved_activation_bytes(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """(alive, packed) bytes saved for backward by one training forward of ``model``."""
    with SavedTensors() as saved:
        out = model(images)
        alive, packed = saved.alive, saved.packed
    del out
    return alive, packed


def _under_backend(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with use_backend(name):
            fn()
    return run


def step_mode(args: argparse.Namespace, device: torch.device) -> None:
    """Saved activations and step time of the ``args.step_bits`` students against FP ResNet-18."""
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    models = {name: build().to(device).train() for name, build in _students(args.step_bits).items()}
    print(f"\n== training step: ResNet-18, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"{device}, Adam, {args.rounds} interleaved rounds, kernels={get_backend()}, "
          f"threads={torch.get_num_threads()}")

    print("saved activations (one training forward; alive = distinct storages kept for backward):")
    base_alive, base_packed = saved_activation_bytes(models["fp"], images)
    backends = [None, "reference"] if args.with_reference else [None]
    for backend in backends:
        for name, model in models.items():
            if backend is not None and name == "fp":
                continue
            with use_backend(backend or get_backend()):
                alive, packed = saved_activation_bytes(model, images)
            label = name if backend is None else f"{name}[ref]"
            print(f"  {label:>11}: alive {alive / 2**20:8.1f} MiB ({alive / base_alive:.2f}x FP)   "
                  f"packed {packed / 2**20:8.1f} MiB ({packed / base_packed:.2f}x FP)")

    teachers = {"off": None}
    if args.teacher in ("on", "both"):
        teachers["on"] = torchvision.models.resnet101().to(device).eval()
    if args.teacher == "on":
        teachers.pop("off")
    for label, teacher in teachers.items():
        fns = {name: make_step(model, teacher, images, labels) for name, model in models.items()}
        if args.with_reference:  # the same students run module by module through the definitions
            for name in [n for n in fns if n != "fp"]:
                fns[f"{name}[ref]"] = _under_backend("reference", fns[name])
        times = interleaved(fns, args.rounds, args.warmup, device)
        base, base_min = median_ms(times["fp"]), min_ms(times["fp"])
        cells = "   ".join(f"{name} {median_ms(t):8.1f} ms ({median_ms(t) / base:.2f}x) "
                           f"[min {min_ms(t):7.1f} ms, {min_ms(t) / base_min:.2f}x]" for name, t in times.items())
        print(f"teacher {label:>3}: {cells}")


# ---------------------------------------------------------------------------------------------
# GPU throughput
# ---------------------------------------------------------------------------------------------


def gpu_mode(args: argparse.Namespace, device: torch.device) -> None:
    """Training (with a ResNet-101 teacher) and eval images/s on CUDA; skipped elsewhere."""
    if device.type != "cuda":
        print("\n== gpu: skipped (no CUDA device)")
        return
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    bs = args.batch_size
    print(f"\n== gpu: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, batch {bs}, "
          f"{args.rounds} interleaved rounds, ResNet-101 teacher (random init)")
    teacher = torchvision.models.resnet101().to(device).eval()
    labels = torch.randint(0, 1000, (bs,), device=device)
    settings = [("fp32", None, False), ("bf16+channels_last", torch.bfloat16, True)]
    for label, amp, channels_last in settings:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        images = torch.randn(bs, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
        t = teacher.to(memory_format=fmt)
        fns, memory = {}, {}
        for name, build in _students(args.step_bits).items():
            model = build().to(device, memory_format=fmt).train()
            fns[name] = make_step(model, t, images, labels, amp)
            if name != "fp":
                fns[f"{name}[torch]"] = _under_backend("torch", fns[name])
        for name, fn in fns.items():  # peak memory, one step each
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize()
            memory[name] = torch.cuda.max_memory_allocated(device)
        times = interleaved(fns, args.rounds, args.warmup, device)
        base = bs / statistics.median(times["fp"])
        print(f"train + teacher, {label}:")
        for name, ts in times.items():
            ips = bs / statistics.median(ts)
            print(f"  {name:>14}: {ips:8.1f} img/s ({ips / base:.2f}x FP)   peak {memory[name] / 2**30:6.2f} GiB")
        evals = {}
        for name, build in _students(args.step_bits).items():
            model = build().to(device, memory_format=fmt).eval()

            def infer(model=model, images=images, amp=amp) -> None:
                with torch.no_grad(), torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
                    model(images)
            evals[name] = infer
        times = interleaved(evals, args.rounds, args.warmup, device)
        base = bs / statistics.median(times["fp"])
        print(f"eval, {label}: " + "   ".join(
            f"{name} {bs / statistics.median(ts):8.1f} img/s ({bs / statistics.median(ts) / base:.2f}x)"
            for name, ts in times.items()))
