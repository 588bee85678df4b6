"""Handing the pages of memory-mapped weights back to the page cache, so that peak memory stays that of the
largest model rather than of all of them (docs/architecture.md, "Loading").

Weights loaded without a cast are the memory-mapped checkpoint file itself; once a model's stage is over, or
once a cast has copied a tensor, its file pages are only held resident by this process. Linux only: elsewhere
(and where /proc/self/pagemap is hidden) nothing is dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from typing import Iterable

import numpy as np
import torch
from torch import nn

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
_MADV_DONTNEED = 4
_PM_PRESENT, _PM_FILE = 1 << 63, 1 << 61  # /proc/PID/pagemap entry bits: page present, page is a file page
_PAGEMAP = "/proc/self/pagemap"


def drop_file_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Drop from this process's resident memory the pages under `tensors` that are still unmodified pages of a
    memory-mapped file. They stay in the kernel's page cache: the next use maps them back by minor page faults,
    without reading the disk. Only pages that /proc/self/pagemap reports as file pages are dropped: a page
    written to (an in-place edit makes a private anonymous copy) and any tensor in ordinary memory are never
    touched, because MADV_DONTNEED would zero them. Without /proc/self/pagemap this does nothing."""
    if _libc is None:
        return
    ranges = []
    for t in tensors:
        if t.device.type == "cpu" and t.nbytes >= _PAGE:
            start = -(-t.data_ptr() // _PAGE)  # whole pages inside the tensor only (page numbers)
            end = (t.data_ptr() + t.nbytes) // _PAGE
            if end > start:
                ranges.append((start, end))
    if not ranges:
        return
    try:
        pagemap = open(_PAGEMAP, "rb")
    except OSError:  # some sandboxes hide it: then nothing is known to be a file page, and nothing is dropped
        return
    with pagemap:
        for start, end in ranges:
            pagemap.seek(start * 8)
            entries = np.frombuffer(pagemap.read((end - start) * 8), dtype=np.uint64)
            droppable = (entries & np.uint64(_PM_PRESENT | _PM_FILE)) == np.uint64(_PM_PRESENT | _PM_FILE)
            # runs of droppable pages: where the flag switches on and off
            edges = np.flatnonzero(np.diff(np.concatenate([[0], droppable.view(np.uint8), [0]])))
            for a, b in zip(edges[::2], edges[1::2]):
                _libc.madvise(ctypes.c_void_p(int(start + a) * _PAGE), ctypes.c_size_t(int(b - a) * _PAGE),
                              _MADV_DONTNEED)


def release(module: nn.Module) -> None:
    """Hand the memory-mapped pages of `module`'s weights back to the page cache (`drop_file_pages`): weights
    loaded without a cast are the mapped file itself (see `weights_convert.common.load_into`). The pipeline
    calls this on each model when its stage is over (text encoders after the prompt, the UNet after the loop,
    ...), so that peak memory is that of the largest model, not of all of them."""
    drop_file_pages([*module.parameters(), *module.buffers()])
