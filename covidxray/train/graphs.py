"""Whole-step CUDA graphs for every task of the training loop.

Any task's step can be graphed when its device work does no host syncs; what varies from step to
step is the task's *variant* (a tuple decided on the host), and each variant gets its own graph.
The motivating case: a GAN step at 128 px is small: on an H100/H200 the GPU finishes its kernels long before the
host has launched the next ones (about 11 ms of GPU work in about 35 ms per ``cgan`` step,
see ``docs/benchmarks.md``). Capturing the whole step - G's forward pass, D's and G's
losses, both backward passes and both fused Adam updates - as one CUDA graph turns about a
thousand kernel launches into one replay.

What the graph cannot contain is decided on the host before each step, and each combination
gets its own graph: for GANs, whether the lazy R1 penalty runs this step, and whether the U-Net
GAN's CutMix coin came up (a classifier's step has one variant). The EMA of G's weights stays
outside (its decay changes during the ramp-up; it is one fused kernel).

Each combination first runs ``WARMUP`` eager steps on a side stream (cuDNN picks its
algorithms, Adam creates its state, lazy initialisations happen), then is captured and
replayed from then on. Capture records work without running it, so the capturing step's
batch is trained by the first replay. The noise and augmentation generators (and PyTorch's
default CUDA generator, which dropout uses) are registered with every graph, so a replay draws the same random numbers an eager step would
and their saved states stay exact for ``--resume``.

If a capture fails (an old PyTorch, an operation that syncs with the host), training goes
on eagerly with a warning, as ``train.compile`` does.
"""

from __future__ import annotations

from typing import Callable

import torch

WARMUP = 2  # eager steps of each graph variant before it is captured


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[torch.Tensor | None, ...],
                 outputs: dict[str, torch.Tensor]):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


def _shape(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else tuple(t.shape)


class StepGraphs:
    """Runs ``step_fn(*inputs, *variant)`` eagerly ``WARMUP`` times per variant, then as CUDA graphs.

    Args:
        step_fn: the task's device work of one step; returns a dict of scalar tensors.
        generators: CUDA generators the step draws from (besides the default one).
        on_failure: called with the exception when a capture fails; graphs are then off.
    """

    def __init__(self, step_fn: Callable[..., dict[str, torch.Tensor]], generators: list[torch.Generator],
                 on_failure: Callable[[BaseException], None]):
        self.step_fn, self.generators, self.on_failure = step_fn, generators, on_failure
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: dict[tuple, int] = {}
        self.failed = False
        self.side = torch.cuda.Stream()

    def step(self, inputs: tuple[torch.Tensor | None, ...], variant: tuple = ()) -> dict[str, torch.Tensor]:
        """One step: ``inputs`` are the batch tensors (copied into the graph's static inputs),
        ``variant`` the host decisions of this step (part of the graph key, passed on to ``step_fn``)."""
        if self.failed:
            return self.step_fn(*inputs, *variant)
        key = (tuple(variant), tuple(_shape(t) for t in inputs))
        g = self.graphs.get(key)
        if g is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= WARMUP:
                return self._side_stream(*inputs, *variant)
            g = self._capture(key, inputs, variant)
            if g is None:  # capture failed: this step (and every later one) runs eagerly
                return self.step_fn(*inputs, *variant)
        for static, t in zip(g.inputs, inputs):
            if static is not None:
                static.copy_(t)
        g.graph.replay()
        return g.outputs

    def _side_stream(self, *args) -> dict[str, torch.Tensor]:
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            out = self.step_fn(*args)
        main.wait_stream(self.side)
        return out

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor | None, ...], variant: tuple) -> _Graph | None:
        # Static inputs live outside the graph's memory pool; each replay copies the batch in
        # (capture only records, so their contents do not matter yet).
        static = tuple(None if t is None else torch.empty_like(t) for t in inputs)
        states = [gen.get_state() for gen in self.generators]
        graph = torch.cuda.CUDAGraph()
        try:
            for gen in self.generators:
                graph.register_generator_state(gen)
            # thread_local: rich's progress thread may run Python meanwhile; it does no CUDA work.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.step_fn(*static, *variant)
        except Exception as exc:  # noqa: BLE001 - any failure means: train eagerly
            self.failed = True
            self.graphs.clear()
            for gen, st in zip(self.generators, states):
                gen.set_state(st)
            self.on_failure(exc)
            return None
        g = _Graph(graph, static, outputs)
        self.graphs[key] = g
        return g
