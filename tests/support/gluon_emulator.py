"""A CPU emulator for the part of Triton's Gluon language the decode kernels use (``inference/kernels/gluon_decode.py``
and ``gluon_seesaw.py``), so that their own source runs without a GPU: the kernel modules are imported afresh under
fake ``triton.experimental.gluon`` modules, and every program of the grid runs its partitions (producer, consumers)
as Python threads.

What it models: shared memory as numpy buffers (``index``, ``slice``, ``permute``, ``load``, ``store``); mbarriers
with phases, arrival counts and transaction bytes (``expect`` arrives and expects bytes; a TMA load delivers them; a
wait on parity P passes once phase P has completed, and times out as a deadlock); TMA loads as copies of the
descriptor's rows, zero past its last row; wgmma as an fp32 matmul, an asynchronous one evaluated only at its wait
(so a buffer reused too early shows in the result); bf16 casts as torch's rounding; pointers as flat numpy arrays
with offsets; a random pause before each barrier operation and copy, for other thread interleavings. What it does
not: layouts (ignored), register pressure, the async proxy and its fences, timing, or any
interleaving a GPU would produce that Python's threads do not.
"""

from __future__ import annotations

import importlib
import random
import sys
import threading
import time
import types

import numpy as np
import torch

WAIT_S = 10.0  # a barrier wait longer than this is a deadlock
JITTER_S = 5e-5  # at most this random pause before each barrier operation and TMA copy: other interleavings
_rng = random.Random(0)


def _jitter():
    if JITTER_S:
        time.sleep(_rng.random() * JITTER_S)


class Deadlock(RuntimeError):
    """A barrier wait that did not pass in ``WAIT_S`` seconds."""


class _Layout:
    """Any layout: accepted and ignored."""

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def get_default_for(cls, *args, **kwargs):
        return cls()


class _Dtype:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name


FLOAT32, BFLOAT16, INT64 = _Dtype("fp32"), _Dtype("bf16"), _Dtype("i64")


def _bf16(x) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def _cast(x, dtype) -> np.ndarray:
    return _bf16(x) if dtype is BFLOAT16 else np.asarray(x, dtype=np.float32)


class T(np.ndarray):
    """A register tensor: a numpy array with ``.type.layout`` and ``.to(dtype)``."""

    @property
    def type(self):
        return types.SimpleNamespace(layout=None)

    def to(self, dtype):
        return _cast(self, dtype).view(T)


def _t(x) -> T:
    return np.asarray(x).view(T)


class Smem:
    """Shared memory: a numpy view and its dtype."""

    def __init__(self, a: np.ndarray, dtype):
        self.a, self.dtype = a, dtype

    @property
    def shape(self):
        return list(self.a.shape)

    def index(self, i):
        return Smem(self.a[int(i)], self.dtype)

    def slice(self, start, length, dim=0):
        return Smem(self.a[int(start) : int(start) + int(length)], self.dtype)

    def permute(self, order):
        return Smem(self.a.transpose(order), self.dtype)

    def reinterpret(self, dtype, shape, layout):
        return Smem(self.a.reshape(shape), dtype)  # the same bytes (a contiguous box) in another shape

    _reinterpret = reinterpret  # Triton 3.6's name

    def load(self, layout=None):
        return _t(self.a.astype(np.float32))

    def store(self, x):
        self.a[...] = _cast(x, self.dtype)


class _Barrier:
    def __init__(self, count: int):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0
        self.cv = threading.Condition()

    def _step(self):
        if self.pending == 0 and self.tx == 0:
            self.phase, self.pending = self.phase + 1, self.count
            self.cv.notify_all()

    def arrive(self, expect_bytes: int = 0):
        _jitter()
        with self.cv:
            self.pending -= 1
            self.tx += expect_bytes
            self._step()

    def deliver(self, nbytes: int):
        with self.cv:
            self.tx -= nbytes
            self._step()

    def wait(self, parity: int):
        _jitter()
        with self.cv:
            if not self.cv.wait_for(lambda: (self.phase - int(parity)) % 2 == 1, WAIT_S):
                raise Deadlock(f"barrier wait on parity {int(parity)} did not pass (phase {self.phase})")


class _Program:
    """The running program's ids and its barriers (keyed by their shared-memory address)."""

    pid, grid, barriers = (0, 0, 0), (1, 1, 1), {}


def _barrier(buf: Smem) -> _Barrier:
    return _Program.barriers[buf.a.__array_interface__["data"][0]]


class Ptr:
    """A pointer: a flat numpy array (float32; int64 for integer tensors) and element offsets (an int or an array)."""

    def __init__(self, flat: np.ndarray, offset=0, element=FLOAT32):
        self.flat, self.offset, self.dtype = flat, offset, types.SimpleNamespace(element_ty=element)

    def __add__(self, other):
        return Ptr(self.flat, self.offset + np.asarray(other), self.dtype.element_ty)

    __radd__ = __add__


class _Pending:
    """An asynchronous wgmma: ``acc + a @ b``, computed when waited for."""

    def __init__(self, thunk):
        self.thunk = thunk

    def value(self):
        return self.thunk()


def _matrix(x) -> np.ndarray:
    if isinstance(x, _Pending):
        return x.value()
    return x.a.astype(np.float32) if isinstance(x, Smem) else np.asarray(x, dtype=np.float32)


def _warpgroup_mma(a, b, acc, use_acc=True, is_async=False, **kwargs):
    def thunk():
        return _t((_matrix(acc) if use_acc else 0.0) + _matrix(a) @ _matrix(b))

    return _Pending(thunk) if is_async else thunk()


def _warpgroup_mma_wait(num_outstanding=0, deps=()):
    out = tuple(d.value() if isinstance(d, _Pending) else d for d in deps)
    return out[0] if len(out) == 1 else out


def _warp_specialize(partitions, worker_warps, worker_regs):
    errors, threads = [], []
    for fn, args in partitions:

        def body(fn=fn, args=args):
            try:
                fn(*args)
            except BaseException as err:  # reported by the launch
                errors.append(err)

        threads.append(threading.Thread(target=body, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT_S)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise Deadlock("a partition did not finish")


def _tma_load(desc, coord, bar, dest: Smem, pred=True):
    _jitter()
    rows, cols = desc.block_type.shape
    r0, c0 = int(coord[0]), int(coord[1])
    box = np.zeros((rows, cols), dtype=np.float32)  # rows past the descriptor's last are zero
    got = desc.g[r0 : r0 + rows, c0 : c0 + cols]
    box[: got.shape[0], : got.shape[1]] = got
    dest.store(box)
    _barrier(bar).deliver(desc.block_type.nbytes)


class TensorDescriptor:
    """The host descriptor, holding the 2-D view it describes (rows x last dim, the given row stride)."""

    def __init__(self, t: torch.Tensor, shape, strides, block_shape, layout):
        view = t.as_strided((shape[0], shape[1]), (strides[0], 1), t.storage_offset())
        self.g = view.float().numpy()
        self.block_type = types.SimpleNamespace(shape=list(block_shape), nbytes=int(np.prod(block_shape)) * 2)
        self.dtype, self.layout = BFLOAT16, layout


def _language() -> types.ModuleType:
    gl = types.ModuleType("triton.experimental.gluon.language")

    class constexpr:  # Gluon's name
        def __new__(cls, value):
            return value

    ns = dict(
        constexpr=constexpr,
        float32=FLOAT32,
        bfloat16=BFLOAT16,
        int64=INT64,
        full=lambda shape, value, dtype, layout=None: _t(np.full(shape, value, dtype=np.float32)),
        zeros_like=lambda x: _t(np.zeros_like(x)),
        arange=lambda start, end, layout=None: _t(np.arange(start, end)),
        where=lambda c, x, y: _t(np.where(c, x, y)),
        max=lambda x, axis: _t(np.max(x, axis=axis)),
        sum=lambda x, axis: _t(np.sum(x, axis=axis, dtype=np.float32)),
        exp2=lambda x: _t(np.exp2(np.asarray(x, dtype=np.float32))),
        maximum=lambda a, b: _t(np.maximum(a, b)) if isinstance(a, np.ndarray) else max(a, b),
        minimum=lambda a, b: _t(np.minimum(a, b)) if isinstance(a, np.ndarray) else min(a, b),
        expand_dims=lambda x, axis: _t(np.expand_dims(x, axis)),
        convert_layout=lambda x, layout: x,
        cdiv=lambda a, b: (a + b - 1) // b,
        program_id=lambda axis: _Program.pid[axis],
        num_programs=lambda axis: _Program.grid[axis],
        load=lambda ptr: ptr.flat[ptr.offset].item() if np.ndim(ptr.offset) == 0 else _t(ptr.flat[ptr.offset]),
        static_range=range,
        thread_barrier=lambda: None,
        barrier=lambda: None,
        warp_specialize=_warp_specialize,
        allocate_shared_memory=lambda dtype, shape, layout: Smem(
            np.zeros(shape, dtype=np.int64 if dtype is INT64 else np.float32), dtype
        ),
    )

    def store(ptr, value):
        ptr.flat[ptr.offset] = _cast(value, ptr.dtype.element_ty)

    ns["store"] = store
    for name in (
        "NVMMADistributedLayout",
        "SliceLayout",
        "DotOperandLayout",
        "BlockedLayout",
        "NVMMASharedLayout",
        "SwizzledSharedLayout",
    ):
        ns[name] = type(name, (_Layout,), {})
    gl.__dict__.update(ns)
    return gl


def _hopper() -> types.ModuleType:
    hopper = types.ModuleType("triton.experimental.gluon.language.nvidia.hopper")
    mbarrier = types.SimpleNamespace(
        MBarrierLayout=_Layout,
        init=lambda buf, count: _Program.barriers.__setitem__(buf.a.__array_interface__["data"][0], _Barrier(count)),
        expect=lambda bar, nbytes, pred=True: _barrier(bar).arrive(int(nbytes)),
        wait=lambda bar, phase, pred=True, deps=(): _barrier(bar).wait(phase),
        arrive=lambda bar, count=1, pred=True: [_barrier(bar).arrive() for _ in range(count)] and None,
    )
    hopper.__dict__.update(
        mbarrier=mbarrier,
        tma=types.SimpleNamespace(async_load=_tma_load),
        fence_async_shared=lambda: None,
        warpgroup_mma=_warpgroup_mma,
        warpgroup_mma_wait=_warpgroup_mma_wait,
    )
    return hopper


KERNEL_MODULES = ("gluon_decode", "gluon_seesaw", "gluon_launch")
PACKAGE = "nemo_mla_lora.inference.kernels"


def emulated_kernels() -> dict:
    """{module name: module} of the kernel modules imported afresh against the emulated Gluon (each binds the fakes
    at import, so it runs on after); ``sys.modules`` and the package's attributes hold the real modules again on
    return."""
    gluon = types.ModuleType("triton.experimental.gluon")
    gluon.jit = lambda fn: fn
    gluon.language = _language()
    hopper_lang, hopper_host = _hopper(), types.ModuleType("triton.experimental.gluon.nvidia.hopper")
    hopper_host.TensorDescriptor = TensorDescriptor
    experimental = types.ModuleType("triton.experimental")
    experimental.gluon = gluon
    fakes = {
        "triton.experimental": experimental,
        "triton.experimental.gluon": gluon,
        "triton.experimental.gluon.language": gluon.language,
        "triton.experimental.gluon.language.nvidia": types.ModuleType("triton.experimental.gluon.language.nvidia"),
        "triton.experimental.gluon.language.nvidia.hopper": hopper_lang,
        "triton.experimental.gluon.nvidia": types.ModuleType("triton.experimental.gluon.nvidia"),
        "triton.experimental.gluon.nvidia.hopper": hopper_host,
    }
    names = [*fakes, *(f"{PACKAGE}.{m}" for m in KERNEL_MODULES)]
    for m in KERNEL_MODULES:  # the real modules first, so that they are what comes back
        importlib.import_module(f"{PACKAGE}.{m}")
    saved_modules = {n: sys.modules.get(n) for n in names}
    package = importlib.import_module(PACKAGE)
    saved_attrs = {m: getattr(package, m) for m in KERNEL_MODULES}
    try:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(fakes)
        return {m: importlib.import_module(f"{PACKAGE}.{m}") for m in KERNEL_MODULES}
    finally:
        for n, module in saved_modules.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module
        for m, module in saved_attrs.items():
            setattr(package, m, module)


def launch(kernel, grid, args, kwargs) -> None:
    """Runs ``kernel`` (an emulated module's kernel function) on every program of ``grid``, one after another; torch
    tensor arguments become pointers over float32 copies, written back into the tensors after the launch."""
    tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    flats = {
        i: (a.long() if not a.is_floating_point() else a.float()).detach().reshape(-1).numpy().copy()
        for i, a in tensors
    }
    args = [
        Ptr(flats[i], 0, BFLOAT16 if a.dtype == torch.bfloat16 else FLOAT32) if i in flats else a
        for i, a in enumerate(args)
    ]
    options = {k: v for k, v in kwargs.items() if k not in ("num_warps", "maxnreg")}
    for pid in np.ndindex(*grid):
        _Program.pid, _Program.grid, _Program.barriers = tuple(int(p) for p in pid), tuple(grid), {}
        kernel(*args, **options)
    for i, a in tensors:
        a.copy_(torch.from_numpy(flats[i]).reshape(a.shape).to(a.dtype))
