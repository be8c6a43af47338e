"""GPU time of small kernels, measured as the engine runs them: replayed from a CUDA graph.

A decode step's products take 4-170 us each on the H200 (run 10, scripts/bench_decode_matmul.py);
timed by plain launches (``triton.testing.do_bench``) the smaller ones partly measure Python's
launcher (below ~0.05 ms on the H100, run 6 of docs/benchmarks.md). Replays of one graph holding
many launches leave only the GPU's time. Weights of a decode step stream from memory (1.4 GB a
step against 50-60 MB of L2), so ``rotating`` copies of the operands keep a timed one out of L2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 192 << 20  # over three times the L2 of an H100 (50 MB) or H200 (60 MB)
# ... in at most this many copies: a tiny weight (a test model's) would otherwise need thousands of
# launches per timing (the first version of this cap-less rule stalled tests/test_gpu.py).
MAX_COPIES = 64


def rotating(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Copies of ``tensor`` whose bytes together exceed L2 several times (the tensor itself when it
    is that large; at most MAX_COPIES)."""
    copies = min(MAX_COPIES, max(1, -(-L2_FLUSH_BYTES // (tensor.numel() * tensor.element_size()))))
    return [tensor] + [tensor.clone() for _ in range(copies - 1)]


def graph_ms(launches: list[Callable[[], object]], replays: int = 5) -> float:
    """Median milliseconds per launch of ``launches``, run in turn inside one CUDA graph (each is
    run once first, outside it: compilation and lazy initialisation)."""
    for launch in launches:
        launch()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):  # as engine.cuda_graphs
            for launch in launches:
                launch()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    graph.replay()  # the first replay uploads the graph
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(launches))
    return sorted(times)[len(times) // 2]
