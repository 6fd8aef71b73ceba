"""Speed options that change how a network computes, not what it computes (up to float rounding).

- `compile_called(model, fn)`: `torch.compile` (inductor) of the outermost submodules that `fn()` calls.
  Which modules a method's loss or sampler calls is found by running it once with forward hooks, so the
  same switch works for every method: CMD's loss calls `autoencoder.encoder` through `encode()`, never
  `autoencoder` itself, and compiling a module whose `forward` is never called does nothing.
  Modules are compiled in place (`nn.Module.compile`), so parameter names and checkpoints are unchanged.
- `to_channels_last(model)`: conv weights in channels-last layout (2D: `channels_last`, 3D:
  `channels_last_3d`); oneDNN then runs those convolutions, and the ops after them, in NHWC.
- `attention_kernel(kind)`: the kernel of every attention layer (`methods.nets.transformer.takes_plain_form`: the
  transformers' `Attention` and, since 2026-12-08, the UNets' `nn.MultiheadAttention` modules) on CPU: `math`
  (the plain softmax(QK^T)V), `fused` (`scaled_dot_product_attention`, which picks PyTorch's flash kernel on
  CPU) or `auto` (fused on CUDA, and on CPU wherever no gradient is recorded: sampling, frozen encoders; when
  training on CPU the plain form for sequences up to 128, and up to 256 with heads of 32+ channels, where its
  backward was measured faster, the fused kernel beyond: `transformer.plain_is_faster`).
- `tune_allocator("reuse")`: glibc's malloc keeps freed memory instead of returning it to the kernel (an
  mmap threshold and a trim threshold of 1 GiB, where glibc's default mmaps every block over 32 MiB and
  trims the heap's top past 128 KiB-32 MiB): without it, every large activation is a fresh mapping whose
  pages fault in on first touch (a `mul` of two 32 MiB tensors took 7x as long for it on a 2-core EPYC;
  whole training steps and samplers gain less, some lose). Process-wide; nothing computes differently
  (bit-identical results).
- `EncodingCache`: the outputs of a frozen encoder kept per input row (a clip), keyed by a hash of the row's
  bytes, so a clip seen again in a later epoch or a later stage is not encoded again (CMD's content and
  motion stages, PVDM's diffusion, ED-VDM's denoiser). The first sight of a clip encodes it in its batch as
  before; later sights read what that gave (equal to encoding it again in another batch up to float
  rounding: oneDNN's kernels may block a batch of one differently).

benchmarks.speedups measures each against the default per method and stage, compile time included;
`trainer.compile`, `trainer.channels_last` and `trainer.attention` switch them on in a run;
`trainer.allocator=reuse` (off by default: it won on some parts and lost on others, CMD's training among
the latter) is measured by benchmarks.allocator, in paired processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

ATTENTION_KERNELS = ("auto", "math", "fused")
ALLOCATORS = ("default", "reuse")  # default: glibc's malloc as it starts; reuse: it keeps freed memory (tune_allocator)
ALLOCATOR_THRESHOLD = 1 << 30  # bytes: blocks below it come from the heap, and up to it stays mapped when freed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
_ALLOCATOR_STATE: dict = {}


def tune_allocator(kind: str = "reuse") -> dict:
    """Sets this process's malloc so that large freed blocks are reused, not unmapped; returns what it did.

    kind "reuse": on glibc (Linux), `mallopt` raises the mmap threshold and the trim threshold to
    ALLOCATOR_THRESHOLD (a glibc that refuses that much gets the largest value it takes, 32 MiB);
    elsewhere (macOS, musl) nothing is changed and the result says so. "default": nothing is changed.
    Process-wide and idempotent; DataLoader workers started by fork inherit it. Numerics are unchanged:
    the same kernels run on the same values, only the memory behind the tensors comes from elsewhere.
    """
    if kind not in ALLOCATORS:
        raise ValueError(f"unknown allocator {kind!r}; choose one of {', '.join(ALLOCATORS)}")
    if kind == "default" or _ALLOCATOR_STATE:  # what this process has: a setting cannot be taken back
        return dict(_ALLOCATOR_STATE) or {"allocator": "default"}
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {"allocator": "default", "why": "no mallopt in this C library (glibc only)"}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for threshold in (ALLOCATOR_THRESHOLD, 32 << 20):
        if mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1:
            _ALLOCATOR_STATE.update(allocator="glibc mallopt", threshold_bytes=threshold)
            return dict(_ALLOCATOR_STATE)
    return {"allocator": "default", "why": "mallopt refused the thresholds"}


def set_attention_kernel(kind: str) -> str:
    """Sets the attention kernel of every `transformer.Attention`; returns the previous one."""
    from methods.nets import transformer

    if kind not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kind!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    previous, transformer.ATTENTION_KERNEL = transformer.ATTENTION_KERNEL, kind
    return previous


@contextmanager
def attention_kernel(kind: str):
    previous = set_attention_kernel(kind)
    try:
        yield
    finally:
        set_attention_kernel(previous)


def called_roots(model: nn.Module, fn: Callable[[], object]) -> list[str]:
    """Names of the outermost submodules of `model` whose forward `fn()` calls (no ancestor of one is called).

    `model` itself is never a root: a method's `loss` and `sample` are not its `forward`.
    """
    names = {id(m): n for n, m in model.named_modules() if n}
    called: list[str] = []

    def hook(module, args):
        name = names.get(id(module))
        if name is not None and name not in called:
            called.append(name)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    seen = set(called)
    return [n for n in called if not any(".".join(n.split(".")[:i]) in seen for i in range(1, n.count(".") + 1))]


def compile_called(model: nn.Module, fn: Callable[[], object], **options) -> list[str]:
    """Compiles, in place, the outermost submodules that `fn()` calls; returns their names.

    Modules compiled already are left as they are (a second call adds only the new roots: the
    sampler's decoder after the training stages' networks, say).
    """
    roots = called_roots(model, fn)
    for name in roots:
        module = model.get_submodule(name)
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(**options)
    return roots


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def to_channels_last(model: nn.Module) -> int:
    """Puts every Conv2d / Conv3d weight in channels-last layout, in place; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
            n += 1
        elif isinstance(m, nn.Conv3d | nn.ConvTranspose3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            n += 1
    return n


class EncodingCache:
    """What a frozen encoder gave for each input row, so that no row is encoded twice.

    `cache(x, fn, module)` returns `fn(x)` (a tensor or a tuple of tensors, each batched on dim 0): rows of
    `x` seen before are read from the cache, the others go through `fn` together and are kept, while the
    cache holds under `max_mb` MiB. A row's key is a hash of its bytes, shape and dtype, so any data
    pipeline (random crops, random clip windows) is cached correctly: a different crop is a different row.
    The cache empties itself when `module` changes: a parameter written in place (an optimiser step, a
    loaded checkpoint), moved, or the module switched between train and eval mode. It never records
    gradients: where autograd is on and `module` has trainable parameters, it calls `fn` directly; and it
    works on the CPU only (measured there): rows on a GPU go to `fn` directly and are counted as `not_on_cpu`,
    since each key would copy the batch to the host and wait for it.
    """

    def __init__(self, max_mb: float) -> None:
        if max_mb <= 0:
            raise ValueError(f"EncodingCache needs a positive size in MiB, got {max_mb}; "
                             "set trainer.encoding_cache=0 to switch the cache off")
        self.max_bytes = int(max_mb * 2**20)
        self.rows: dict[bytes, tuple[bool, tuple[Tensor, ...]]] = {}  # key -> (fn gave one tensor, its rows)
        self.bytes = 0
        self.hits = self.misses = self.full = 0  # rows read, rows encoded, rows not kept (the cache was full)
        self.elsewhere = 0  # rows on another device than the CPU, encoded without the cache
        self._state: tuple | None = None

    @staticmethod
    def state(module: nn.Module) -> tuple:
        """What must not change while cached outputs stay valid: every parameter's storage and version (the counter
        PyTorch bumps on every in-place write), and the mode."""
        return (module.training, *((p.data_ptr(), p._version, p.dtype) for p in module.parameters()))

    @staticmethod
    def key(row: Tensor) -> bytes:
        data = row.detach().contiguous().cpu()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy(), digest_size=20)  # hashed in place, no copy
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        return digest.digest()

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "not_kept": self.full, "not_on_cpu": self.elsewhere,
                "rows": len(self.rows), "mb": round(self.bytes / 2**20, 1)}

    def __call__(self, x: Tensor, fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]], module: nn.Module):
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            return fn(x)  # a trained encoder: nothing to cache
        if x.device.type != "cpu":  # not measured on a GPU, where each key would copy the batch to the host
            self.elsewhere += len(x)
            return fn(x)
        state = self.state(module)
        if state != self._state:
            self.clear()
            self._state = state
        keys = [self.key(row) for row in x]
        todo: dict[bytes, int] = {}  # rows to encode: key -> the first row with it
        for i, k in enumerate(keys):
            if k not in self.rows and k not in todo:
                todo[k] = i
        fresh: dict[bytes, tuple[bool, tuple[Tensor, ...]]] = {}
        if todo:
            rows = list(todo.values())
            out = fn(x if len(rows) == len(x) else x[rows])
            single = isinstance(out, Tensor)
            parts = (out,) if single else tuple(out)
            self.misses += len(rows)
            for j, k in enumerate(todo):
                fresh[k] = (single, tuple(p[j] for p in parts))
                self._keep(k, single, parts, j)
            if len(rows) == len(x):
                return out  # nothing was cached: the encoder's own batch, as without the cache
        self.hits += len(x) - len(todo)
        entries = [fresh[k] if k in fresh else self.rows[k] for k in keys]
        single = entries[0][0]
        stacked = tuple(torch.stack([e[1][n] for e in entries]) for n in range(len(entries[0][1])))
        return stacked[0] if single else stacked

    def _keep(self, key: bytes, single: bool, parts: tuple[Tensor, ...], j: int) -> None:
        row = tuple(p[j].clone() for p in parts)  # its own storage: the batch is freed
        size = sum(t.numel() * t.element_size() for t in row)
        if self.bytes + size > self.max_bytes:
            self.full += 1
            return
        self.rows[key] = (single, row)
        self.bytes += size
