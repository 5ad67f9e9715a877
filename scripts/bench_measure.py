"""How ``scripts/benchmark.py`` measures: interleaved timing rounds and the bytes autograd saves.

These helpers live beside the benchmark script, not in the installed ``n2uq`` package: they are
measurement tools for comparing variants on one machine (timing protocol, saved-tensor counting),
not part of training or inference, and the benchmark that uses them also needs the repository's
``resnet/`` models and the specification's forms in ``tests/spec_forms.py``, which are not installed.
"""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from typing import Callable, Dict, List

import torch
from torch import Tensor

__all__ = ["interleaved", "SavedTensors", "median_ms", "min_ms"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int,
                device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each function, measured round-robin ``rounds`` times after warm-up.

    Python's cyclic garbage collector is run before each call and paused during it (as ``timeit``
    does): otherwise the garbage one variant leaves (the spec loop form leaves thousands of
    objects) is collected, at random, inside the timing of the next one.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                gc.collect()
                gc.disable()
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
        else:
            gc.disable()
    return times


class SavedTensors:
    """Counts what autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``).

    ``packed``: bytes of every saved tensor, each time one is saved (a tensor saved by two ops counts
    twice). ``alive``: bytes of the distinct storages still held for backward once the forward has
    finished (each storage once) — the activation memory a training step keeps.
    """

    class _Held:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor: Tensor):
            self.tensor = tensor

    def __init__(self) -> None:
        self.packed = 0
        self._held: List[weakref.ref] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor):
        self.packed += tensor.numel() * tensor.element_size()
        held = self._Held(tensor)
        self._held.append(weakref.ref(held))
        return held

    @staticmethod
    def _unpack(held) -> Tensor:
        return held.tensor

    @property
    def alive(self) -> int:
        storages = {}
        for ref in self._held:
            held = ref()
            if held is not None:
                storage = held.tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def median_ms(values: List[float]) -> float:
    """The median of timings in seconds, in milliseconds."""
    return statistics.median(values) * 1e3


def min_ms(values: List[float]) -> float:
    """The fastest of timings in seconds, in milliseconds."""
    return min(values) * 1e3
