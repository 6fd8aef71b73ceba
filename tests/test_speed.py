"""Speed options (methods.speed): same numbers as the default path, wired into the config and the benchmark."""

import csv

import pytest
import torch
from torch import nn

from benchmarks import speedups
from benchmarks.common import build_datamodule, build_method, data_spec
from benchmarks.config import ConfigError, config_hash, load_config
from methods import METHODS
from methods.base import VideoBatch
from methods.nets import transformer
from methods.speed import attention_kernel, called_roots, compile_called, is_compiled, set_attention_kernel, to_channels_last


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Outer(nn.Module):
    """`run` calls `inner` through a helper and `head` directly, never `unused` or its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head, self.unused = Inner(), nn.Linear(4, 2), nn.Linear(4, 4)

    def encode(self, x):
        return self.inner(x)

    def run(self, x):
        return self.head(self.encode(x))


def test_called_roots_are_the_outermost_called_modules_in_call_order():
    m = Outer()
    assert called_roots(m, lambda: m.run(torch.randn(3, 4))) == ["inner", "head"]  # not inner.a / inner.b, not unused
    assert called_roots(m, lambda: m.inner.b(torch.randn(3, 8))) == ["inner.b"]
    assert called_roots(m, lambda: None) == []


def test_compile_called_compiles_in_place_and_keeps_outputs_and_names():
    torch.manual_seed(0)
    m, x = Outer(), torch.randn(5, 4)
    want, keys = m.run(x), list(m.state_dict())
    roots = compile_called(m, lambda: m.run(x), backend="eager")  # the wiring; inductor is checked below
    assert roots == ["inner", "head"] and is_compiled(m.inner) and is_compiled(m.head) and not is_compiled(m.unused)
    assert list(m.state_dict()) == keys  # checkpoints unchanged: no `_orig_mod.` prefix
    torch.testing.assert_close(m.run(x), want)
    assert compile_called(m, lambda: m.run(x), backend="eager") == roots  # a second call compiles nothing twice


def test_inductor_compiled_network_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    m, x = Outer(), torch.randn(6, 4)
    ref = Outer()
    ref.load_state_dict(m.state_dict())
    compile_called(m, lambda: m.run(x))
    out, want = m.run(x), ref.run(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(m.inner.a.weight.grad, ref.inner.a.weight.grad, rtol=1e-4, atol=1e-5)


def test_channels_last_changes_the_layout_not_the_result():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1))
    net3 = nn.Conv3d(3, 4, 3, padding=1)
    x, x3 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 8, 8)
    want, want3 = net(x), net3(x3)
    assert to_channels_last(net) == 2 and to_channels_last(net3) == 1
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net3.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net3(x3), want3, rtol=1e-5, atol=1e-5)


def test_channels_last_method_gives_the_same_loss():
    cfg = load_config(["method=vdm", "scale=test"])
    dm = build_datamodule(cfg)
    spec = data_spec(cfg, dm)
    torch.manual_seed(0)
    plain = build_method(cfg, spec)
    torch.manual_seed(0)
    fast = build_method(load_config(["method=vdm", "scale=test", "trainer.channels_last=true"]), spec)
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    video = torch.rand(2, *spec.video_shape) * 2 - 1
    batch = VideoBatch(video=video, label=torch.tensor([0, 1]))
    torch.manual_seed(1)
    a = plain.loss("denoiser", batch)["loss"]
    torch.manual_seed(1)
    b = fast.loss("denoiser", batch)["loss"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["math", "fused"])
def test_attention_kernels_agree(kind):
    torch.manual_seed(0)
    attn, x = transformer.Attention(32, 4), torch.randn(3, 10, 32)
    with attention_kernel("math"):
        want = attn(x)
    with attention_kernel(kind):
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)
    assert transformer.ATTENTION_KERNEL == "auto"  # restored
    with pytest.raises(ValueError, match="choose one of"):
        set_attention_kernel("flash")


def test_speed_keys_are_checked_and_absent_from_the_hash_at_their_defaults():
    with pytest.raises(ConfigError, match="did you mean 'fused'"):
        load_config(["method=vdm", "scale=test", "trainer.attention=fusd"])
    with pytest.raises(ConfigError, match="trainer.compile"):
        load_config(["method=vdm", "scale=test", "trainer.compile=maybe"])
    cfg = load_config(["method=vdm", "scale=test"])
    explicit = load_config(["method=vdm", "scale=test", "trainer.compile=false", "trainer.attention=auto"])
    assert config_hash(cfg) == config_hash(explicit)
    # a config stored before the keys existed hashes as it did
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(cfg)
    for k in ("compile", "channels_last", "attention"):
        del old["trainer"][k]
    assert config_hash(old) == config_hash(cfg)
    assert config_hash(load_config(["method=vdm", "scale=test", "trainer.channels_last=true"])) != config_hash(cfg)


def test_speedups_benchmark_compares_each_option_with_the_default(tmp_path):
    rows = speedups.main(["methods=cmd", "options=channels_last,attention=fused", "steps=1", "scale=test",
                          "sample.steps=2", f"out={tmp_path}"])
    parts = {r["part"] for r in rows}
    assert parts == {"train:image_prior", "train:autoencoder", "train:content", "train:motion", "sample"}
    assert {r["option"] for r in rows} == {"default", "channels_last", "attention=fused"}
    for r in rows:
        assert r["seconds"] > 0 and r["first_seconds"] > 0
        if r["option"] != "default":
            assert r["speedup"] > 0 and isinstance(r["wins_over_run"], bool)
    with open(tmp_path / "speedups.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with pytest.raises(SystemExit, match="trainer.attention"):
        speedups.main(["methods=vdm", "options=attention=flashy", "scale=test", f"out={tmp_path}"])


def test_speedups_can_time_sampling_alone_over_more_rounds(tmp_path):
    rows = speedups.main(["methods=pvdm", "options=attention=fused", "train=false", "sample_rounds=3", "scale=test",
                          "sample.steps=2", f"out={tmp_path}"])
    assert {r["part"] for r in rows} == {"sample"} and {r["option"] for r in rows} == {"default", "attention=fused"}
    assert all(r["repeats"] == 3 for r in rows)


def test_speedups_records_an_option_that_fails_and_measures_the_rest(tmp_path, monkeypatch):
    """A compiler error in one arm (ED-VDM under inductor's dynamic shapes did this) is that option's row, not
    the method's: the default and the other options are still measured."""
    import methods.speed

    def broken(*args, **kwargs):
        raise RuntimeError("inductor says no\nsecond line")

    monkeypatch.setattr(methods.speed, "compile_called", broken)
    rows = speedups.main(["methods=vdm", "options=compile,channels_last", "steps=1", "scale=test", "sample.steps=2",
                          f"out={tmp_path}"])
    failed = [r for r in rows if "error" in r]
    assert {(r["part"], r["option"]) for r in failed} == {("train:denoiser", "compile"), ("sample", "compile")}
    assert all(r["error"] == "RuntimeError: inductor says no" for r in failed)
    ok = [r for r in rows if "error" not in r]
    assert {(r["part"], r["option"]) for r in ok} == {(p, o) for p in ("train:denoiser", "sample")
                                                      for o in ("default", "channels_last")}
    assert all(r["seconds"] > 0 for r in ok) and all(r["speedup"] > 0 for r in ok if r["option"] != "default")
    table = speedups.markdown(rows, {"bf16_matmul_gflops": 1.0, "cpu_model": "x", "threads": 1})
    assert table.count("failed: RuntimeError: inductor says no") == 2


@pytest.mark.parametrize("native, want", [(True, "bf16-mixed"), (False, "32-true")])
def test_precision_auto_is_bf16_only_where_bf16_is_native(monkeypatch, native, want):
    from benchmarks import machine

    monkeypatch.setattr(machine, "fast_bf16", lambda device="cpu": native)
    cfg = load_config(["method=cmd", "scale=tiny"])
    assert cfg.trainer.precision == want  # resolved: the saved config and the row say what ran
    assert load_config(["method=cmd", "scale=tiny", "trainer.precision=bf16-mixed"]).trainer.precision == "bf16-mixed"
    assert load_config(["method=cmd", "scale=test"]).trainer.precision == "32-true"
    if native:  # on a bf16 machine the resolved config hashes as the explicit one did before `auto` existed
        assert config_hash(cfg) == config_hash(load_config(["method=cmd", "scale=tiny", "trainer.precision=bf16-mixed"]))


def test_fast_bf16_agrees_with_a_measurement():
    """Native bf16 units multiply bf16 faster than fp32 (AMX: ~7x); without them bf16 is far slower (AVX2: ~150x)."""
    from benchmarks import machine

    ratio = machine.matmul_gflops(torch.bfloat16, 512, 0.2) / machine.matmul_gflops(torch.float32, 512, 0.2)
    assert machine.fast_bf16() == (ratio > 0.8), ratio


def test_probe_size_shrinks_where_one_product_would_not_fit(monkeypatch):
    from benchmarks import machine

    def size(per_256: float, budget: float) -> int:
        clock = iter([0.0, per_256])  # the timed 256^2 product
        monkeypatch.setattr(machine.time, "perf_counter", lambda: next(clock))
        return machine.probe_size(torch.float32, budget, torch.device("cpu"))

    assert size(1.0, 2.0) == 256  # even 256^2 is slow: the smallest size
    assert size(1e-3, 1.0) == 1024  # 512^2: 8 ms, 1024^2: 64 ms, 2048^2: 0.5 s > 1 s / 4
    assert size(1e-3, 3.0) == machine.SIZE
    assert size(1e-6, 100.0) == machine.SIZE  # never above SIZE


@pytest.mark.parametrize("length, dim, heads, fused", [(7, 32, 4, False), (200, 64, 2, False), (200, 32, 4, True),
                                                       (300, 64, 1, True)])
def test_auto_attention_trains_in_the_plain_form_on_cpu_where_it_was_measured_faster(monkeypatch, length, dim, heads,
                                                                                       fused):
    """auto, training on CPU: the plain form for sequences up to 128, and up to 256 with heads of 32+ channels, the
    fused kernel beyond; wherever no gradient is recorded (sampling, frozen encoders) the fused kernel. The same values."""
    calls = []
    sdpa = nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    assert transformer.plain_is_faster(length, dim // heads) is not fused
    torch.manual_seed(0)
    attn, x = transformer.Attention(dim, heads), torch.randn(2, length, dim)
    trained = attn(x)
    assert len(calls) == fused and trained.requires_grad
    with torch.no_grad():
        sampled = attn(x)
    with torch.inference_mode():
        attn(x)
    assert len(calls) == fused + 2
    with attention_kernel("fused" if not fused else "math"):  # the other kernel: the same values
        torch.testing.assert_close(attn(x), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled, trained.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["auto", "math", "fused"])
def test_the_unets_multihead_attention_computes_what_torch_computes(kind, monkeypatch):
    """The UNets keep their `nn.MultiheadAttention` modules (checkpoints load as before) and compute through the
    kernel rule: training on CPU over 10 tokens, auto and math take the plain form (not the module's own forward),
    fused the module's forward; the same output and the same gradients either way."""
    torch.manual_seed(0)
    mha, x = nn.MultiheadAttention(16, 4, batch_first=True), torch.randn(3, 10, 16, requires_grad=True)
    want = mha(x, x, x, need_weights=False)[0]
    want_grads = torch.autograd.grad(want.square().sum(), [x, *mha.parameters()])
    own = []
    forward = mha.forward
    monkeypatch.setattr(mha, "forward", lambda *a, **k: own.append(1) or forward(*a, **k))
    with attention_kernel(kind):
        got = transformer.multihead_self_attention(mha, x)
        got_grads = torch.autograd.grad(got.square().sum(), [x, *mha.parameters()])
    assert len(own) == (kind == "fused")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_position_tables_are_cached_per_grid_and_survive_inference_mode():
    def fresh_1d(n, dim):  # the formula, computed here without the cache
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
        args = torch.arange(n, dtype=torch.float32)[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)

    transformer._POSITIONS.clear()
    with torch.inference_mode():  # a sampler is the first to ask
        first = transformer.sincos_2d(3, 5, 8)
    assert transformer.sincos_2d(3, 5, 8) is first  # the same table, not recomputed
    assert transformer.sincos_2d(5, 3, 8) is not first and transformer.sincos_1d(4, 6) is not transformer.sincos_1d(4, 8)
    torch.testing.assert_close(transformer.sincos_1d(9, 6), fresh_1d(9, 6))
    torch.testing.assert_close(first.view(3, 5, 8)[:, 0, :4], fresh_1d(3, 4))  # rows, then columns
    torch.testing.assert_close(first.view(3, 5, 8)[0, :, 4:], fresh_1d(5, 4))
    assert not first.is_inference()
    w = torch.ones(8, requires_grad=True)
    (transformer.sincos_2d(3, 5, 8) * w).sum().backward()  # a training step may save it for backward
    torch.testing.assert_close(w.grad, first.sum(0))


ALLOCATION_FAULTS = """
import resource, sys, torch
from methods.speed import tune_allocator
state = tune_allocator(sys.argv[1])
faults = []
for _ in range(4):  # a 128 MiB activation made and freed, as every training step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(32 << 20)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(state.get("allocator"), min(faults[1:]), sep="|")
"""


def _glibc() -> bool:
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="tune_allocator sets glibc's malloc; elsewhere it changes nothing")
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in_again():
    import subprocess
    import sys

    def faults(kind):  # the allocator is process-wide: each arm in a fresh process
        out = subprocess.run([sys.executable, "-c", ALLOCATION_FAULTS, kind], capture_output=True, text=True, check=True)
        state, n = out.stdout.strip().split("|")
        return state, int(n)

    state, tuned = faults("reuse")
    assert state == "glibc mallopt"
    _, default = faults("default")
    pages = (128 << 20) // 4096  # every page of a fresh mapping faults in on first touch
    assert default >= pages // 2, default
    assert tuned < pages // 20, tuned  # the heap keeps the block: its pages are already there


def test_allocator_key_is_checked_and_leaves_the_hash_alone():
    from methods.speed import tune_allocator

    with pytest.raises(ConfigError, match="did you mean 'reuse'"):
        load_config(["method=vdm", "scale=test", "trainer.allocator=reuser"])
    with pytest.raises(ValueError, match="choose one of"):
        tune_allocator("jemalloc")
    cfg = load_config(["method=vdm", "scale=test"])
    assert cfg.trainer.allocator == "default"
    assert config_hash(load_config(["method=vdm", "scale=test", "trainer.allocator=reuse"])) == config_hash(cfg)


def test_allocator_benchmark_pairs_the_arms_and_flags_samples_that_differ():
    from benchmarks import allocator

    def arm(seconds, sha):
        return [{"part": "train:denoiser", "kind": "train", "batch_size": "4", "precision": "32-true",
                 "seconds": str(seconds), "best_seconds": str(seconds)},
                {"part": "sample", "kind": "sample", "batch_size": "2", "precision": "32-true",
                 "seconds": str(2 * seconds), "best_seconds": str(2 * seconds), "sample_sha256": sha}]

    rows = allocator.pair_rows("vdm", 0, {"default": arm(2.0, "ab"), "reuse": arm(1.0, "ab")})
    rows += allocator.pair_rows("vdm", 1, {"default": arm(3.0, "ab"), "reuse": arm(1.0, "cd")})
    table = {r["part"]: r for r in allocator.summary(rows)}
    assert table["train:denoiser"]["speedup"] == pytest.approx(2.5 / 1.0)  # medians over the rounds
    assert table["sample"]["same_samples"] is False  # one round drew different samples
    assert table["train:denoiser"]["same_samples"] == ""
    assert "**no**" in allocator.markdown(list(table.values()), {})


# --- the encoding cache (methods.speed.EncodingCache) -------------------------------------------------------------


class Counted(nn.Module):
    """A frozen 'encoder' that counts the rows it encodes and gives two outputs per row."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.rows = 0

    def encode(self, x):
        self.rows += len(x)
        return self.net(x), x.sum(dim=1)


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def test_encoding_cache_gives_the_encoders_outputs_and_encodes_each_distinct_row_once():
    from methods.speed import EncodingCache

    enc, cache = _frozen(Counted()), EncodingCache(1)
    x = torch.randn(4, 3)
    first = cache(x, enc.encode, enc)
    assert enc.rows == 4 and cache.stats()["hits"] == 0
    y = torch.cat([x[2:], torch.randn(2, 3)])
    y = torch.cat([y, y[3:]])  # a new row twice in one batch: encoded once
    got = cache(y, enc.encode, enc)
    assert enc.rows == 6
    assert cache.stats() | {"mb": 0} == {"hits": 3, "misses": 6, "not_kept": 0, "not_on_cpu": 0, "rows": 6, "mb": 0}
    want = enc.net(y), y.sum(dim=1)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(first[0], enc.net(x))
    again = cache(x, enc.encode, enc)  # every row seen: nothing encoded
    assert enc.rows == 6 and torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_encoding_cache_empties_when_the_encoder_changes_and_stops_at_its_size():
    from methods.speed import EncodingCache

    enc, cache = _frozen(Counted()), EncodingCache(1)
    x = torch.randn(5, 3)
    cache(x, enc.encode, enc)
    with torch.no_grad():
        enc.net.weight.add_(1.0)  # as an optimiser step or a loaded checkpoint writes it
    torch.testing.assert_close(cache(x, enc.encode, enc)[0], enc.net(x))
    assert enc.rows == 10
    enc.net.load_state_dict(Counted().net.state_dict())
    torch.testing.assert_close(cache(x, enc.encode, enc)[0], enc.net(x))
    enc.train(not enc.training)  # another mode may compute otherwise (dropout, norms)
    cache(x, enc.encode, enc)
    assert enc.rows == 20

    small = EncodingCache(40 / 2**20)  # 40 bytes: three rows of 2 + 1 floats (12 bytes each)
    out = small(x, enc.encode, enc)
    assert small.stats()["rows"] == 3 and small.stats()["not_kept"] == 2 and small.bytes <= 40
    torch.testing.assert_close(small(x, enc.encode, enc)[0], out[0])  # kept and re-encoded rows alike
    assert enc.rows == 27


def test_encoding_cache_leaves_a_trained_encoder_alone_and_checks_its_size():
    from methods.speed import EncodingCache

    enc, cache = Counted(), EncodingCache(1)  # trainable: gradients must flow, nothing kept
    x = torch.randn(3, 3)
    cache(x, enc.encode, enc)[0].sum().backward()
    assert enc.net.weight.grad is not None and cache.stats()["rows"] == 0
    with pytest.raises(ValueError, match="trainer.encoding_cache=0"):
        EncodingCache(0)
    cfg = load_config(["method=cmd", "scale=test"])
    with pytest.raises(ValueError, match="MiB"):
        build_method(load_config(["method=cmd", "scale=test", "trainer.encoding_cache=-1"]),
                     data_spec(cfg, build_datamodule(cfg)))
    assert config_hash(load_config(["method=cmd", "scale=test", "trainer.encoding_cache=256"])) == config_hash(cfg)


CACHED_STAGES = {("cmd", "content"), ("cmd", "motion"), ("pvdm", "diffusion"), ("edvdm", "denoiser")}


@pytest.mark.parametrize("name, stage", [(m, s) for m in METHODS for s in METHODS[m].stages])
def test_encoding_cache_keeps_every_stage_loss(name, stage):
    """The same loss with and without the cache, on a batch seen for the first and the second time; the stages
    with a frozen encoder read it back the second time."""
    from benchmarks.efficiency import _freeze_for

    cfg = load_config([f"method={name}", "scale=test"])
    dm = build_datamodule(cfg)
    spec = data_spec(cfg, dm)
    torch.manual_seed(0)
    plain = build_method(cfg, spec)
    torch.manual_seed(0)
    cached = build_method(load_config([f"method={name}", "scale=test", "trainer.encoding_cache=64"]), spec)
    batch = next(iter(dm.loader_for("train", shuffle=False, drop_last=True, batch_size=2, seed=0)))
    for m in (plain, cached):
        _freeze_for(m, stage)
    for visit in range(2):
        losses = []
        for m in (plain, cached):
            torch.manual_seed(10 + visit)
            losses.append(m.loss(stage, batch)["loss"])
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    stats = cached.encoding_cache.stats()
    if (name, stage) in CACHED_STAGES:
        assert stats["misses"] > 0 and stats["hits"] > 0, stats  # PVDM draws new clip windows: some rows are new
    else:
        assert stats["misses"] == stats["hits"] == 0, f"{name}:{stage} encodes through the cache: add it to CACHED_STAGES"


def test_miss_share_counts_a_first_pass_of_encodings_then_what_the_cache_could_not_keep():
    from benchmarks.preflight import miss_share

    assert miss_share(100, 100, 0.0, 1.0) == (1.0, 1.0)  # one pass over the items: every step encodes
    assert miss_share(400, 100, 0.0, 1.0) == (0.25, 1.0)  # four passes, everything kept: the first encodes
    assert miss_share(400, 100, 0.0, 0.0) == (1.0, 0.0)  # nothing kept: every pass encodes
    assert miss_share(400, 100, 0.0, 0.5) == pytest.approx((0.625, 0.5))  # 100 + 300 x 0.5 of 400
    assert miss_share(50, 100, 0.8, 1.0) == (0.0, 0.8)  # the stage before cached the first 80 items: read back
    assert miss_share(200, 100, 0.8, 1.0) == pytest.approx((0.1, 1.0))  # ... then 20 new ones, then one more pass
    assert miss_share(0, 100, 0.3, 1.0) == (1.0, 0.3)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_dry_pass_times_a_cached_stage_encoding_and_reading_back(name):
    """A stage reading a frozen encoder through the cache is timed both ways; the plan's step is their mix by the
    expected share of encoding steps. CMD's motion stage reads the clips its content stage encoded."""
    from benchmarks.preflight import dry_pass, miss_share

    cfg = load_config([f"method={name}", "scale=test", "trainer.encoding_cache=64"])
    dm = build_datamodule(cfg)
    method = build_method(cfg, data_spec(cfg, dm))
    plan = dry_pass(cfg, method, dm, {s: "train" for s in method.stages})
    assert method.encoding_cache is not None  # put back after the timing without it
    for sp in plan.stages:
        cached = (name, sp.stage) in CACHED_STAGES
        assert (sp.cached_seconds is not None) == cached, (name, sp.stage)
        assert sp.step_seconds > 0 and (not cached or sp.cached_seconds > 0)
        lo, hi = sorted((sp.step_seconds, sp.cached_seconds if cached else sp.step_seconds))
        assert lo <= sp.mean_step_seconds <= hi
        assert 0.0 <= sp.miss_share <= 1.0 and (cached or sp.miss_share == 1.0)
    if name == "cmd":
        items = len(dm.dataset("train"))
        content, motion = plan.stages[2], plan.stages[3]
        alone, _ = miss_share(motion.steps * motion.batch_size, items, 0.0, 1.0)
        assert alone == 1.0 and motion.miss_share == 0.0  # it reads back the content stage's first batches
        assert f"{content.miss_share:.0%} of its steps expected to encode" in plan.table()


def test_encoding_cache_benchmark_times_the_stages_that_encode_through_the_cache(tmp_path):
    from benchmarks import encoding_cache

    rows = encoding_cache.main(["methods=cmd,vdm", "scale=test", "steps=1", f"out={tmp_path}"])
    assert [(r["method"], r["stage"]) for r in rows] == [("cmd", "content"), ("cmd", "motion")]
    assert all(r["seconds_new"] > 0 and r["seconds_cached"] > 0 for r in rows)
    with open(tmp_path / "encoding_cache.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_cmd_run_with_the_encoding_cache_reads_the_content_stages_clips_back_and_trains_the_same_weights(tmp_path):
    """The motion stage's loader starts with the content stage's batches (the same seed): every clip is read back;
    the weights are those of the run without the cache, bit for bit (the same batches are encoded once instead of
    twice), and the row counts what each stage encoded and read."""
    from benchmarks import run
    from benchmarks.run_folder import RunFolder

    def args(name: str, *extra: str) -> list[str]:
        return ["method=cmd", "scale=test", f"runs_root={tmp_path / name}", f"results={tmp_path / 'results.jsonl'}",
                f"cache_dir={tmp_path / name / 'cache'}", *extra]

    plain = run.main(args("plain", "trainer.encoding_cache=0"))
    cached = run.main(args("cached", "trainer.encoding_cache=64"))
    assert plain["encoding_cache"] is None
    assert cached["encoding_cache"]["content"] | {"mb": 0} == {"hits": 0, "misses": 4, "not_kept": 0, "not_on_cpu": 0,
                                                              "rows": 4, "mb": 0}
    assert cached["encoding_cache"]["motion"]["hits"] == 4 and cached["encoding_cache"]["motion"]["misses"] == 0
    stages = METHODS["cmd"].stages
    a = torch.load(RunFolder(plain["run_dir"]).final_checkpoint(stages), weights_only=True)
    b = torch.load(RunFolder(cached["run_dir"]).final_checkpoint(stages), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_dry_pass_leaves_every_buffer_as_it_was(name):
    """The dry pass's loss calls run in training mode: without the restore they move BatchNorm statistics and the
    PatchGAN's step counter (so a run that had a dry pass reached `gan.start` earlier than the same run resumed)."""
    from benchmarks.preflight import _one_batch, dry_pass

    gan = [f"method.autoencoder.loss.gan.{k}={v}" for k, v in (("weight", 1), ("layers", 1), ("channels", 4))]
    with_gan = name in ("cmd", "pvdm")
    cfg = load_config([f"method={name}", "scale=test", *(gan if with_gan else [])])
    dm = build_datamodule(cfg)
    method = build_method(cfg, data_spec(cfg, dm))
    before = {k: b.clone() for k, b in method.named_buffers()}
    dry_pass(cfg, method, dm, {s: "train" for s in method.stages})
    after = dict(method.named_buffers())
    assert before.keys() == after.keys() and [k for k in before if not torch.equal(before[k], after[k])] == []
    if with_gan:  # what the restore undoes: one training-mode loss call moves the counter and the statistics
        counters = [k for k in after if k.endswith("loss.step")]
        assert counters and all(int(after[k]) == 0 for k in counters)
        method.train()
        method.loss("autoencoder", _one_batch(dm, 2, 0))
        moved = [k for k, b in method.named_buffers() if not torch.equal(before[k], b)]
        assert set(counters) <= set(moved) and any("running_mean" in k for k in moved)


def test_the_attention_kernel_benchmark_times_both_kernels_and_scores_the_rule(tmp_path, capsys):
    from benchmarks import attention_kernels

    rows = attention_kernels.main(["lengths=8,160", "head_dims=8,32", "tokens=640", "repeats=1", "rounds=1",
                                   "precision=32-true", f"out={tmp_path}"])
    assert {(r["mode"], r["length"], r["head_dim"]) for r in rows} == {
        (m, n, d) for m in ("train", "sample") for n in (8, 160) for d in (8, 32)}
    for r in rows:
        assert r["plain_seconds"] > 0 and r["fused_seconds"] > 0
        assert r["plain_over_fused"] == pytest.approx(r["plain_seconds"] / r["fused_seconds"])
        plain = r["mode"] == "train" and transformer.plain_is_faster(r["length"], r["head_dim"])
        assert r["rule"] == ("plain" if plain else "fused")  # what auto picks: sampling always fused
        assert r["rule_is_faster"] == ((r["plain_over_fused"] <= 1) == (r["rule"] == "plain"))
        assert r["batch"] * r["heads"] * r["length"] <= 640
    assert {r["rule"] for r in rows} == {"plain", "fused"}  # 160 tokens with 8-channel heads: fused
    with open(tmp_path / "attention_kernels.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "attention_kernels.png").stat().st_size > 0
    assert "| train | 8 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown option 'length=8'; did you mean lengths="):
        attention_kernels.main(["length=8"])
    with pytest.raises(SystemExit, match="tokens='many' is not a whole number"):
        attention_kernels.main(["tokens=many"])
