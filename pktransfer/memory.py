"""Process memory: anonymous resident memory, and handing freed memory back to the system."""

from __future__ import annotations

import functools
import gc
import resource
from typing import Any


def _status_bytes(key: str) -> int | None:
    """A ``/proc/self/status`` field given in kB (``RssAnon``, ``VmRSS``), in bytes; None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_anon_bytes() -> int:
    """Anonymous resident memory (excludes reclaimable file-backed pages such as mmapped safetensors)."""
    anon = _status_bytes("RssAnon")
    return anon if anon is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Resident memory, file-backed pages included: a model loaded from safetensors in its file's dtype on a CPU is
    mapped from the file, so its weights are resident pages that :func:`rss_anon_bytes` leaves out (0 where
    /proc cannot be read)."""
    return _status_bytes("VmRSS") or 0


def release_memory() -> int:
    """Collect garbage and hand freed memory back to the system: CUDA's cache, and on glibc ``malloc_trim(0)``.

    Without the trim a long ``pkt compare`` process grew from cell to cell: glibc keeps freed tensor buffers of
    up to 32 MB in its heaps (its mmap threshold rises after each large free), and a gkd cell that peaked at 18 GiB
    in a fresh process was killed at 24 GiB as the eighth cell of one. Returns the anonymous RSS released, in bytes
    (0 where it cannot be read)."""
    before = rss_anon_bytes()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()
    return max(0, before - rss_anon_bytes())


def trim_heap() -> None:
    """glibc's ``malloc_trim(0)``: hand the free pages of its heaps back to the system (no-op elsewhere).

    Also called after every CPU training step (pktransfer.training), so that one step's freed activations do not
    stay in the heaps for the next. Why: the MMLU study's seeking+gkd seed-1 cell was killed for memory at
    24.3 GiB in its 11th step (its seed-0 cell had peaked at 22.5 GiB); resumed in a fresh process, the same steps
    swung between 9 and 13 GiB, and the low point between steps rose by about 0.2 GiB a step."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (it now runs after every training step); None where there is none."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None
