"""Memory checks for Triton kernels run through the interpreter (TRITON_INTERPRET=1), the CPU's
stand-in for compute-sanitizer's memcheck and racecheck.

The interpreter loads and stores through raw addresses: an access outside the kernel's buffers
reads whatever lies there (or writes over it), silently, and its programs run one after another,
so two programs that touch the same address give a fixed answer that a GPU would not. With
:func:`install`, every launch through the interpreter is checked:

* **bounds**: every element a load or a store touches (mask true) lies inside one of the launch's
  tensor arguments: between the lowest and the highest byte of that argument's view;
* **races between programs**: in one launch, no byte is written by two programs, or written by one
  and read by another (a GPU runs the programs concurrently, in no set order);
* **read after write within a program**: a program does not load a byte it stored earlier in the
  same launch (Triton orders global memory between a program's threads only through barriers it
  does not insert).

A violation raises :class:`MemcheckError`, naming the kernel, the program, the argument nearest to
the address and the offset from it. Inside a program the interpreter wraps the error in its
``InterpreterError``, whose message keeps this one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import torch


class MemcheckError(AssertionError):
    """A Triton kernel read or wrote outside its arguments, or two programs raced."""


@dataclasses.dataclass
class _Argument:
    name: str
    lo: int   # first byte of the view
    hi: int   # one past its last byte


@dataclasses.dataclass
class _Launch:
    kernel: str
    arguments: list
    # the union of the arguments' spans as disjoint intervals, ascending: [lo[i], hi[i])
    lo: np.ndarray
    hi: np.ndarray
    pid: Optional[tuple] = None
    # per program: unique element addresses read and written, by element size
    reads: dict = dataclasses.field(default_factory=dict)
    writes: dict = dataclasses.field(default_factory=dict)
    # the current program's accesses, not yet merged
    pending_reads: list = dataclasses.field(default_factory=list)
    own_writes: list = dataclasses.field(default_factory=list)
    own_span: tuple = (0, 0)  # the bytes they cover, from the lowest to one past the highest


_stack: list = []
_installed = False
launches_checked = 0
accesses_checked = 0
faults_found = 0


def _fail(message: str) -> None:
    global faults_found
    faults_found += 1
    raise MemcheckError(message)


def _view_span(tensor) -> Optional[tuple]:
    if tensor.numel() == 0:
        return None
    size = tensor.element_size()
    low = sum(min(0, (n - 1) * s) for n, s in zip(tensor.shape, tensor.stride()))
    high = sum(max(0, (n - 1) * s) for n, s in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return start + low * size, start + (high + 1) * size


def _arguments(names, args, kwargs) -> list:
    from triton.runtime.jit import TensorWrapper

    found = []

    def visit(name, value):
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                visit(f"{name}[{i}]", item)
            return
        if isinstance(value, TensorWrapper):  # triton.reinterpret
            value = value.base
        if not isinstance(value, torch.Tensor):
            return
        span = _view_span(value)
        if span is not None:
            found.append(_Argument(name, *span))

    for name, value in zip(names, args):
        visit(name, value)
    for name, value in kwargs.items():
        visit(name, value)
    return found


def _union(arguments: list) -> dict:
    merged: list = []
    for lo, hi in sorted((a.lo, a.hi) for a in arguments):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return dict(lo=np.array([m[0] for m in merged], dtype=np.uint64),
                hi=np.array([m[1] for m in merged], dtype=np.uint64))


def _describe(launch: _Launch, address: int) -> str:
    if not launch.arguments:
        return f"address {address:#x} (the launch has no tensor argument)"
    best = min(launch.arguments, key=lambda a: 0 if a.lo <= address < a.hi
               else min(abs(address - a.lo), abs(address - (a.hi - 1))))
    if address < best.lo:
        where = f"{best.lo - address} bytes before"
    elif address >= best.hi:
        where = f"{address - best.hi} bytes past the end of"
    else:
        where = f"byte {address - best.lo} of"
    return f"address {address:#x}, {where} argument '{best.name}' ({best.hi - best.lo} bytes)"


def _element_size(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _bytes(addresses: np.ndarray, size: int) -> np.ndarray:
    return (addresses[:, None] + np.arange(size, dtype=np.uint64)[None, :]).reshape(-1)


def _merge(store: dict, pid: tuple, pending: list) -> None:
    by_size: dict = {}
    for addresses, size in pending:
        by_size.setdefault(size, []).append(addresses)
    mine = store.setdefault(pid, {})
    for size, parts in by_size.items():
        if size in mine:
            parts.append(mine[size])
        mine[size] = np.unique(np.concatenate(parts))


def _switch_program(launch: _Launch, pid: tuple) -> None:
    if launch.pid is not None:
        _merge(launch.reads, launch.pid, launch.pending_reads)
        _merge(launch.writes, launch.pid, launch.own_writes)
    launch.pid = pid
    launch.pending_reads = []
    launch.own_writes = []
    launch.own_span = (0, 0)


def _touched(launch: _Launch, ptrs, mask, kind: str) -> Optional[np.ndarray]:
    """The element addresses a load or a store touches, after the bounds check."""
    global accesses_checked
    from triton.runtime.interpreter import interpreter_builder

    pid = tuple(interpreter_builder.grid_idx)
    if pid != launch.pid:
        _switch_program(launch, pid)
    addresses = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    else:
        addresses = addresses.reshape(-1)
    if addresses.size == 0:
        return None
    accesses_checked += 1
    size = _element_size(ptrs)
    if launch.lo.size:
        interval = np.searchsorted(launch.lo, addresses, side="right") - 1
        inside = (interval >= 0) & (addresses + np.uint64(size) <= launch.hi[np.maximum(interval, 0)])
    else:
        inside = np.zeros(addresses.shape, dtype=bool)
    if not inside.all():
        bad = addresses[~inside]
        _fail(
            f"{launch.kernel}: program {pid} {kind} {bad.size} element(s) of {size} bytes outside "
            f"every tensor argument; the first at {_describe(launch, int(bad[0]))}")
    return addresses


def _access(ptrs, mask, kind: str) -> tuple:
    """(launch, element addresses, element size) of a load or a store inside a checked launch,
    after the bounds check; addresses None outside a launch or when the mask is all false."""
    if not _stack:
        return None, None, 0
    launch = _stack[-1]
    return launch, _touched(launch, ptrs, mask, kind), _element_size(ptrs)


def _check_own_writes(launch: _Launch, addresses: np.ndarray, size: int) -> None:
    low, high = launch.own_span
    # most loads read other tensors than the program's outputs: outside the span, nothing to match
    if not launch.own_writes or int(addresses.max()) + size <= low or int(addresses.min()) >= high:
        return
    written = np.concatenate([_bytes(a, s) for a, s in launch.own_writes])
    hit = np.isin(_bytes(addresses, size), written)
    if hit.any():
        first = int(_bytes(addresses, size)[hit][0])
        _fail(
            f"{launch.kernel}: program {launch.pid} loads a byte it stored earlier in the launch "
            f"({_describe(launch, first)}); nothing orders that between its threads on a GPU")


def _check_races(launch: _Launch) -> None:
    """After the last program: no byte written by two programs, none written by one, read by
    another."""
    _switch_program(launch, None)
    written, writer = [], []
    for index, (pid, by_size) in enumerate(launch.writes.items()):
        parts = [_bytes(a, s) for s, a in by_size.items()]
        mine = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
        written.append(mine)
        writer.append(np.full(mine.size, index, dtype=np.int64))
    if not written:
        return
    pids = list(launch.writes)
    written_all = np.concatenate(written)
    writer_all = np.concatenate(writer)
    if written_all.size == 0:
        return
    order = np.argsort(written_all, kind="stable")
    written_all, writer_all = written_all[order], writer_all[order]
    twice = np.nonzero(written_all[1:] == written_all[:-1])[0]
    if twice.size:
        i = int(twice[0])
        _fail(
            f"{launch.kernel}: programs {pids[writer_all[i]]} and {pids[writer_all[i + 1]]} both write "
            f"{_describe(launch, int(written_all[i]))} (a race on a GPU)")
    low, high = written_all[0], written_all[-1]
    for pid, by_size in launch.reads.items():
        for size, addresses in by_size.items():
            near = addresses[(addresses + np.uint64(size) > low) & (addresses <= high)]
            if near.size == 0:
                continue
            read = _bytes(near, size)
            slot = np.clip(np.searchsorted(written_all, read), 0, written_all.size - 1)
            hit = written_all[slot] == read
            if not hit.any():
                continue
            me = pids.index(pid) if pid in launch.writes else -1
            foreign = writer_all[slot][hit] != me
            if foreign.any():
                byte = int(read[hit][foreign][0])
                other = pids[int(writer_all[slot][hit][foreign][0])]
                _fail(
                    f"{launch.kernel}: program {pid} reads {_describe(launch, byte)}, which program "
                    f"{other} writes in the same launch (a race on a GPU)")


def install() -> None:
    """Wrap the interpreter's launches, loads and stores with the checks above (idempotent). Only
    in a process that runs Triton through the interpreter."""
    global _installed
    if _installed:
        return
    import triton.runtime.interpreter as interpreter

    builder = interpreter.InterpreterBuilder
    executor = interpreter.GridExecutor
    original_load = builder.create_masked_load
    original_store = builder.create_masked_store
    original_init = executor._init_args_hst
    original_call = executor.__call__

    def create_masked_load(self, ptrs, mask, other, *rest):
        launch, addresses, size = _access(ptrs, mask, "loads")
        if addresses is not None:
            _check_own_writes(launch, addresses, size)
            launch.pending_reads.append((addresses, size))
        return original_load(self, ptrs, mask, other, *rest)

    def create_masked_store(self, ptrs, value, mask, *rest):
        launch, addresses, size = _access(ptrs, mask, "stores")
        if addresses is not None:
            launch.own_writes.append((addresses, size))
            low, high = int(addresses.min()), int(addresses.max()) + size
            if len(launch.own_writes) > 1:
                low, high = min(low, launch.own_span[0]), max(high, launch.own_span[1])
            launch.own_span = (low, high)
        return original_store(self, ptrs, value, mask, *rest)

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_init(self, args_dev, kwargs)
        arguments = _arguments(self.arg_names, args_hst, kwargs_hst)
        _stack.append(_Launch(
            kernel=getattr(self.fn, "__name__", str(self.fn)), arguments=arguments,
            **_union(arguments)))
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        global launches_checked
        depth = len(_stack)
        try:
            result = original_call(self, *args, **kwargs)
            if len(_stack) > depth:
                _check_races(_stack[-1])
                launches_checked += 1
            return result
        finally:
            del _stack[depth:]

    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    executor._init_args_hst = init_args_hst
    executor.__call__ = call
    _installed = True


def enabled() -> bool:
    """Whether the test session installs the checks: under the interpreter, unless
    ATTENSCRIBBLE_TRITON_MEMCHECK=0."""
    return (os.environ.get("TRITON_INTERPRET") == "1"
            and os.environ.get("ATTENSCRIBBLE_TRITON_MEMCHECK", "1") != "0")
