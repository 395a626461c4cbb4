"""What stays in the resident set: glibc's heap after loading, and pages of mapped files.

Measured on the default model (README, "Where the memory of ``llamakin generate`` goes"), the
process's peak RSS is set less by what llamakin keeps than by what the C library and the kernel
keep for it: transients glibc does not hand back, and pages of the memory-mapped GGUF file that
stay mapped after they were read. Each function here is a no-op where its call is unavailable
(not glibc, not Linux), so it changes memory, never values.

* :func:`large_allocations_mapped` / :func:`release_freed_memory`: glibc's heap while and after
  loading.
* :func:`page_dropper` / :func:`release_pages` / :func:`advise_random`: a tensor that *is* part of a read-only file
  mapping (:meth:`llamakin.io.gguf.GGUFFile.mapped`), through ``madvise(2)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import mmap
from collections.abc import Callable

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MAPPED_FROM = 128 * 1024  # glibc's initial threshold
MAPPED_AFTER = 32 * 1024 * 1024  # glibc's largest dynamic threshold (64-bit)
PAGE = mmap.PAGESIZE


@functools.cache
def _libc():
    """The C library, or None where it is not glibc (mallopt/malloc_trim/madvise missing)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt, libc.malloc_trim, libc.madvise  # noqa: B018  (all three or none)
    except (OSError, AttributeError):
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


@contextlib.contextmanager
def large_allocations_mapped():
    """Within: every allocation from 128 KiB up gets its own ``mmap``, returned to the OS by
    ``free`` (glibc). Otherwise glibc raises its threshold to the size of each freed mapping, and
    the loader's transients (one per tensor, up to tens of MB) then come from the heap, which
    keeps them: measured on the default model, peak RSS while loading 714 -> 523 MB. After it the
    threshold is glibc's largest dynamic one (32 MiB), what the heap would have reached anyway."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MAPPED_FROM)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MAPPED_AFTER)


def release_freed_memory() -> None:
    """Hand memory freed by loading's temporaries back to the OS (glibc keeps it otherwise:
    measured 186 MB of the default model's resident set)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _advise(address: int, length: int, advice: int) -> None:
    libc = _libc()
    if libc is not None and length > 0:
        libc.madvise(address, length, advice)  # advice only: a failure changes nothing read


def mapped_span(tensor: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the whole storage ``tensor`` views: for a tensor made from a file
    mapping (:meth:`llamakin.io.gguf.GGUFFile.mapped`), the mapped bytes, whatever its strides."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def in_file_mapping(address: int, length: int) -> bool:
    """Whether bytes ``address : address + length`` lie inside one mapping of a file
    (``/proc/self/maps``; False where it cannot be read)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # lo-hi perms offset device inode [path]
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address and address + length <= hi:
                    return len(fields) == 6 and fields[5].startswith("/")
    except OSError:
        pass
    return False


def page_dropper(address: int, length: int) -> Callable[[int, int], None] | None:
    """For bytes ``address : address + length`` inside one mapping of a file, read-only in
    practice: ``drop(start, stop)``, which drops the whole pages within bytes ``start:stop`` of
    that range from the resident set (``MADV_DONTNEED``; they stay in the OS page cache and are
    read back, unchanged, when touched; partial pages at either end are left alone, so no byte
    outside is affected). None for a range that is not inside one file mapping (anonymous
    memory, whose dropped pages would read back as zeros). ``/proc/self/maps`` is read here,
    once, not at every drop (a loader drops a table's pages slice by slice)."""
    if not in_file_mapping(address, length):
        return None

    def drop(start: int, stop: int) -> None:
        first = -(-(address + start) // PAGE) * PAGE
        _advise(first, (address + stop) // PAGE * PAGE - first, getattr(mmap, "MADV_DONTNEED", 4))

    return drop


def release_pages(address: int, length: int) -> None:
    """Drop the whole pages inside bytes ``address : address + length`` of a file mapping
    (:func:`page_dropper`); a range that is not inside one is left alone."""
    drop = page_dropper(address, length)
    if drop is not None:
        drop(0, length)


def advise_random(address: int, length: int) -> None:
    """Tell the kernel that bytes ``address : address + length`` (file-mapped) are read at
    scattered places (``MADV_RANDOM``: no read-ahead around a fault). Measured on the default
    model's embedding (Linux 6.18): 50 random lookups made 23.5 MB of the file resident without
    it, 3.1 MB with it. What a fault maps also depends on the page-cache folios the file already
    has (a file just written can sit in 2 MB folios, mapped whole), which advice cannot change."""
    first = address // PAGE * PAGE
    _advise(first, address + length - first, getattr(mmap, "MADV_RANDOM", 1))
