"""Process memory: anonymous resident memory, and handing freed memory back to the system."""

from __future__ import annotations

import gc
import resource


def rss_anon_bytes() -> int:
    """Anonymous resident memory (excludes reclaimable file-backed pages such as mmapped safetensors)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        pass
    return max(0, before - rss_anon_bytes())
