"""Our Triton FlashAttention kernel, run by Triton's CPU interpreter, against the plain-math reference; and the code
Triton's compiler makes of it for an H100, inspected without one."""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import minicontrol.attention as attn
import minicontrol.flash as flash
import minicontrol.tuning as tuning
from minicontrol.attention import attention_math
from minicontrol.flash import FlashAttention, split_width
from minicontrol.tuning import TILES, flash_attention

# SD shapes scaled down: self-attention at 1024/256/64 tokens, cross-attention to 77 text tokens, odd query counts
LENGTHS = [(64, 64), (256, 256), pytest.param(1024, 1024, marks=pytest.mark.slow), (256, 77), (100, 77), (77, 100)]
WIDTHS = [40, 64, 80, 160]                 # SD1.5: 40/80/160 (8 heads), SD2.1: 64 (64-wide heads)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def tensors(nq, nk, d, dtype, seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    # q from a (B, N, H*d) projection viewed as (B, H, N, d): the non-contiguous layout the UNet passes in
    q = torch.randn(b, nq, 2 * d, generator=g).view(b, nq, 2, d).transpose(1, 2)
    k, v = (torch.randn(b, 2, nk, d, generator=g) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq,nk", LENGTHS)
@pytest.mark.parametrize("d", WIDTHS)
def test_forward_writes_every_element_and_matches(d, nq, nk, dtype):
    if nq == 1024 and dtype == torch.bfloat16:
        pytest.skip("the 1024-token case runs once, in float32, to keep the interpreter quick")
    q, k, v = tensors(nq, nk, d, dtype, b=1 if nq == 1024 else 2)      # 1024 tokens: one batch item, two heads
    out = torch.full(q.shape, float("nan"), dtype=dtype)                # poisoned: any unwritten element stays NaN
    flash_attention(q, k, v, out=out)
    assert not out.isnan().any()
    assert rel(out, attention_math(*(t.float() for t in (q, k, v)))) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", WIDTHS)
def test_gradients_match(d, dtype):
    q, k, v = (t.requires_grad_() for t in tensors(100, 77, d, dtype, seed=1))
    grad = torch.randn(2, 2, 100, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    ours = torch.autograd.grad(FlashAttention.apply(q, k, v, flash_attention), (q, k, v), grad)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(attention_math(qf, kf, vf), (qf, kf, vf), grad.float())
    for a, b in zip(ours, ref):
        assert rel(a, b) <= TOL[dtype]


def test_each_width_times_its_own_tiles_once_per_shape(monkeypatch, tmp_path):
    small, wide, padded = (64, 32, 4, 3, False), (128, 64, 8, 3, False), (128, 64, 8, 3, True)
    monkeypatch.setattr(tuning, "TILES", {40: [small, padded], 64: [small, wide]})
    assert tuning.tiles_at(40) == [small, padded] and tuning.tiles_at(64) == [small, wide]
    assert tuning.tiles_at(48) == [small]                              # a width never measured: the tiles all share
    # as on a GPU: each tile timed by do_bench, the fastest kept for the shape, one too big for shared memory skipped
    monkeypatch.setattr(flash, "INTERPRET", False)
    monkeypatch.setattr(tuning, "picks", {})
    monkeypatch.setattr(tuning, "plans", {})
    monkeypatch.setattr(tuning, "CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU A")
    launched = []

    class Kernel:                   # stands for _flash_fwd: records the tile of each launch, from its constants
        def __getitem__(self, grid):
            return lambda *args, BLOCK_M, BLOCK_N, num_warps, num_stages, D, D0, D1, **rest: launched.append(
                (BLOCK_M, BLOCK_N, num_warps, num_stages, (D0, D1) != split_width(D)))
    monkeypatch.setattr(flash, "_flash_fwd", Kernel())

    def do_bench(fn, **kwargs):
        fn()
        if launched[-1] == padded:
            raise triton.runtime.errors.OutOfResources(240 * 1024, 227 * 1024, "shared memory")
        return {small: 2.0, wide: 1.0}[launched[-1]]
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    for d, fastest in ((64, wide), (40, small)):
        q, k, v = tensors(100, 77, d, torch.float16)
        launched.clear()
        flash_attention(q, k, v)
        flash_attention(q, k, v)                                       # the same shape again: no timing
        assert launched == tuning.TILES[d] + [fastest, fastest]
    flash_attention(*tensors(256, 77, 64, torch.float16))              # a new shape is timed anew
    assert launched[-3:] == [small, wide, wide]
    monkeypatch.setattr(tuning, "TILES", {80: [padded]})               # no tile fits this GPU: the smallest does
    launched.clear()
    flash_attention(*tensors(100, 77, 80, torch.float16))
    assert launched == [padded, tuning.SMALLEST] and tuning.SMALLEST == small
    # the picks are kept on disk: a new run (nothing in memory) launches them untimed, however the timings would go now
    kept = json.loads((tmp_path / "attention_tiles.json").read_text())
    assert len(kept) == 4 and all("GPU A" in key for key in kept)
    monkeypatch.setattr(tuning, "picks", {})
    monkeypatch.setattr(tuning, "plans", {})
    monkeypatch.setattr(tuning, "TILES", {40: [small, padded], 64: [small, wide]})
    launched.clear()
    flash_attention(*tensors(100, 77, 64, torch.float16))
    assert launched == [wide]
    # another GPU, or another tile list, is measured anew
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU B")
    monkeypatch.setattr(tuning, "picks", {})
    monkeypatch.setattr(tuning, "plans", {})
    launched.clear()
    flash_attention(*tensors(100, 77, 64, torch.float16))
    assert launched == [small, wide, wide] and len(json.loads((tmp_path / "attention_tiles.json").read_text())) == 5


@pytest.mark.parametrize("d", [40, 80, 160])
def test_padded_width_writes_every_element_and_matches(d):
    # pieces of at least 64 (64 for 40, 128 for 80, 128 + 64 for 160), the tail masked, for the tile timing to weigh
    q, k, v = tensors(100, 77, d, torch.float32)
    out = torch.full((2, 2, 100, d), float("nan"))
    flash_attention(q, k, v, out=out, tile=(64, 32, 4, 3, True))
    assert not out.isnan().any()
    assert rel(out, attention_math(q, k, v)) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_at_odd_offsets(dtype):
    # rows of d + 1 elements starting one element in: no stride shares a factor of two, so no wide loads may be assumed
    d, g = 40, torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, d + 1, generator=g, dtype=dtype)[..., 1:] for n in (100, 77, 77))
    out = torch.full((2, 2, 100, d + 1), float("nan"), dtype=dtype)[..., 1:]
    flash_attention(q, k, v, out=out)
    assert not out.isnan().any()
    assert rel(out, attention_math(*(t.float() for t in (q, k, v)))) <= TOL[dtype]


def test_each_layout_gets_its_own_launch_plan():
    # flash_attention works the kernel's arguments out once per layout; the same shapes with other strides (the UNet's
    # view, contiguous, rows of d + 1 starting one in) must each get their own, the second time too
    d, g = 40, torch.Generator().manual_seed(5)
    ref = [torch.randn(2, 2, n, d, generator=g) for n in (100, 77, 77)]
    layouts = [[t.transpose(1, 2).contiguous().transpose(1, 2) for t in ref], [t.contiguous() for t in ref],
               [torch.zeros(*t.shape[:3], d + 1)[..., 1:].copy_(t) for t in ref]]
    expected = attention_math(*ref)
    for q, k, v in layouts + layouts:
        assert rel(flash_attention(q, k, v), expected) <= TOL[torch.float32]


def test_a_backward_goes_through_the_autograd_function_and_sampling_launches_directly(monkeypatch):
    # on a GPU, attention() runs the kernel inside FlashAttention when a backward may follow (training: some input
    # requires gradients) and launches it directly otherwise (sampling); a direct launch in training would leave the
    # trained projections without gradients
    class OnGPU(torch.Tensor):                       # CPU tensors that attention() takes for CUDA ones
        is_cuda = property(lambda self: True)
    calls = []
    monkeypatch.setattr(attn, "has_tensor_core_code", lambda device: True)
    monkeypatch.setattr(tuning, "plan", lambda q, k, v, sdpa: lambda q, k, v: calls.append("direct") or q)
    monkeypatch.setattr(attn.FlashAttention, "apply", lambda q, k, v, run: calls.append("autograd") or q)
    q, k, v = (t.as_subclass(OnGPU) for t in tensors(8, 8, 40, torch.float32))
    trained = k.detach().requires_grad_()            # a key from a projection being trained
    attn.attention(q, k, v)
    attn.attention(q, trained, v)
    with torch.no_grad():
        attn.attention(q, trained, v)
    with torch.inference_mode():
        attn.attention(q, k, v)
    assert calls == ["direct", "autograd", "direct", "direct"]


def test_width_split():
    assert [split_width(d) for d in (40, 64, 80, 160)] == [(32, 16), (64, 0), (64, 16), (128, 32)]
    assert [split_width(d, pad=True) for d in (40, 64, 80, 160)] == [(64, 0), (64, 0), (128, 0), (128, 64)]
    assert split_width(512) is None                      # the VAE's single wide head takes PyTorch's kernel


def compile_sm90(cases):
    """[[d, dtype, layout, tile], ...] compiled for sm_90 by tests/compile_sm90.py, outside the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_sm90.py")
    run = subprocess.run([sys.executable, script, json.dumps(cases)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


@pytest.mark.slow
def test_hopper_code_moves_whole_vectors_prefetches_and_fits():
    # d = 40 rows are 80 bytes: only the strides' common factor of two lets the compiler load vectors rather than
    # single elements, and only vectors let it copy the next key and value tiles into shared memory while the current
    # one is computed. Every tile the autotuner may try, at every SD width, in both 16-bit types, in the UNet's layout
    cases = [[d, dtype, "unet", list(tile)] for d in WIDTHS for tile in TILES[d] for dtype in ("float16", "bfloat16")]
    cases += [[40, "float16", "contiguous", list(TILES[40][0])]] + [[d, "float16", "unet", [128, 64, 8, 3, True]]
                                                                     for d in (40, 80, 160)]  # pieces of 64 or more
    *codes, odd = compile_sm90(cases + [[40, "float16", "odd", list(TILES[40][0])]])
    for case, code in zip(cases, codes):
        assert code["b16_loads"] == 0 and code["async_copies"] > 0 and code["wgmma"] > 0, (case, code)
        assert code["shared"] <= 227 * 1024, (case, code)                    # an H100's shared memory per block
    assert odd["b16_loads"] > 0 and odd["async_copies"] == 0          # rows at odd offsets: one element at a time


@pytest.mark.slow
def test_kernel_runs_only_where_triton_makes_tensor_core_code(monkeypatch):
    # attention() sends CUDA tensors to our kernel from MIN_CAPABILITY on: there Triton's compiler turns the kernel's
    # products into tensor-core instructions; one generation below (Turing, sm_75) they become scalar multiply-adds
    major, minor = attn.MIN_CAPABILITY
    tile = list(TILES[40][0])
    cases = [[40, dtype, "unet", tile, cap] for cap in (10 * major + minor, 75) for dtype in ("float16", "bfloat16")]
    at_16, at_bf16, below_16, below_bf16 = compile_sm90(cases)
    assert at_16["mma"] > 0 and at_bf16["mma"] > 0 and at_16["async_copies"] > 0
    assert below_16["mma"] == below_16["wgmma"] == below_bf16["mma"] == below_bf16["wgmma"] == 0
    for capability, expected in (((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)):
        attn.has_tensor_core_code.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert attn.has_tensor_core_code(torch.device("cuda", 0)) is expected
    attn.has_tensor_core_code.cache_clear()


@pytest.mark.slow
def test_gpu_launch_path_times_the_tiles_that_fit_once_per_shape(tmp_path):
    # flash_attention on Triton's own launch path (not the interpreter) with a stand-in H100 driver, the kernel compiled
    # for sm_90 and its launches recorded (tests/launch_sm90.py): q (2, 8, 64, 160) and k, v (2, 8, 77, 160) in fp16
    # as the UNet lays them out, tiles 64x32 (80 KiB of shared memory) and 128x128 (280 KiB, more than an H100 has);
    # nothing is timed: the stand-in do_bench runs each tile once and says 128x128 is the faster wherever it fits
    small, big = [64, 32, 4, 3, False], [128, 128, 8, 3, False]
    script = os.path.join(os.path.dirname(__file__), "launch_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for shared, fit in ((227 * 1024, [small]), (10 ** 6, [small, big])):
        env["MINICONTROL_CACHE"] = str(tmp_path / str(shared))
        run = subprocess.run([sys.executable, script, str(shared)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        report = json.loads(run.stdout)
        launches, timed, (best,) = report["launches"], report["timed"], report["best"]
        assert {tuple(launch["ints"][-2:]) for launch in launches[:timed]} == {(t[0], t[1]) for t in fit}
        assert timed == len(fit) + 1                                     # each tile that fits run once, then the pick
        assert best == fit[-1] and len(launches) == timed + 1                # the same shape again: launched, not timed
        assert launches[-1]["ints"][-2:] == best[:2]
        for launch in launches:
            block_m = launch["ints"][-2]
            assert launch["grid"] == [(64 + block_m - 1) // block_m, 16, 1]
            # strides (batch, head, token) in 16-byte units (VEC = 8 halves), 1 for the width; heads, lengths, widths
            assert launch["ints"][:21] == [10240, 20, 160, 1, 12320, 20, 160, 1, 12320, 20, 160, 1, 10240, 20, 160, 1,
                                           8, 64, 77, 160, 128] and launch["ints"][21:23] == [32, 8]
        assert report["same_layout"]
        # a second run finds the pick kept on disk and launches it at once
        run = subprocess.run([sys.executable, script, str(shared)], env=env, capture_output=True, text=True)
        again = json.loads(run.stdout)
        assert again["timed"] == 1 and again["best"] == [best] and again["launches"][0]["ints"][-2:] == best[:2]


def stand_in(cache, winner, mode=""):
    """tests/launch_sm90.py through attention(), do_bench saying `winner` is faster; a process of its own: a run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(MINICONTROL_CACHE=str(cache), MINICONTROL_ATTENTION=mode)
    script = os.path.join(os.path.dirname(__file__), "launch_sm90.py")
    run = subprocess.run([sys.executable, script, str(227 * 1024), winner], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def test_the_default_times_sdpa_beside_our_tiles_keeps_the_pick_and_runs_it(tmp_path):
    # attention() at a new shape on the GPU path: our tiles timed (the 128x128 one needs more shared memory than an H100
    # has), then the fastest of them against PyTorch's SDPA; the pick is kept on disk, and the layout runs it
    small = [64, 32]
    for winner, kept_pick in (("sdpa", "sdpa"), ("ours", [64, 32, 4, 3, False])):
        report = stand_in(tmp_path / winner, winner)
        assert report["timed"] == [small, small, "sdpa"]
        kept = json.loads((tmp_path / winner / "attention_tiles.json").read_text())
        assert [pick for key, pick in kept.items() if "'sdpa'" in key] == [kept_pick]
        if winner == "sdpa":                            # SDPA called, the kernel never launched outside the timing
            assert report["sdpa_runs"] == 2 and report["launches"] == []
        else:
            assert report["sdpa_runs"] == 0 and [launch["ints"][-2:] for launch in report["launches"]] == [small, small]
    # a new run finds the pick on disk: nothing timed, SDPA run as before
    assert stand_in(tmp_path / "sdpa", "sdpa") == dict(timed=[], launches=[], sdpa_runs=2)


def test_the_environment_forces_our_kernel_or_sdpa(tmp_path):
    # MINICONTROL_ATTENTION=ours: SDPA is neither timed nor run, though it would be measured faster; =sdpa: nothing is
    # timed and SDPA runs, though our kernel would be measured faster
    ours = stand_in(tmp_path / "ours", "sdpa", mode="ours")
    assert ours["timed"] == [[64, 32]] and ours["sdpa_runs"] == 0 and len(ours["launches"]) == 2
    assert stand_in(tmp_path / "sdpa", "ours", mode="sdpa") == dict(timed=[], launches=[], sdpa_runs=2)


def test_an_unknown_mode_raises_in_the_library_and_leaves_the_program_running():
    # a program importing the library is not ended by a mistyped MINICONTROL_ATTENTION: attention() and check_mode()
    # raise ValueError (the scripts turn it into one line before reading any weights)
    code = ("import torch, minicontrol.attention as a\n"
            "x = torch.zeros(1, 1, 4, 8)\n"
            "for call in (a.check_mode, lambda: a.attention(x, x, x)):\n"
            "    try:\n"
            "        call()\n"
            "    except ValueError as e:\n"
            "        print(e)\n")
    env = dict(os.environ, MINICONTROL_ATTENTION="flash")
    root = os.path.join(os.path.dirname(__file__), "..")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("MINICONTROL_ATTENTION=flash: give auto") for line in lines)
    assert all("ours" in line and "sdpa" in line for line in lines)


@pytest.mark.parametrize("nq,nk", [(600, 600), (256, 77), (100, 77)])
@pytest.mark.parametrize("d", WIDTHS)
def test_cpu_chunks_match_the_closed_form(d, nq, nk):
    # 600 queries: two whole chunks of 256 and a part one; float64 for the closed form, bfloat16 as sampling runs it,
    # no further from float64 than twice PyTorch's own SDPA in bfloat16
    q, k, v = tensors(nq, nk, d, torch.float64)
    exact = attention_math(q, k, v)
    assert rel(attn.attention_in_chunks(q, k, v), exact) < 1e-12
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q16, k16, v16)
    assert rel(attn.attention_in_chunks(q16, k16, v16), exact) < 2 * rel(sdpa, exact)


def test_the_cpu_takes_chunks_only_for_bfloat16_sampling(monkeypatch):
    calls = []

    def chunks(q, k, v):
        calls.append(q.dtype)
        return q
    monkeypatch.setattr(attn, "attention_in_chunks", chunks)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = tensors(64, 77, 40, dtype)
        with torch.no_grad():
            attn.attention(q, k, v)
        attn.attention(q.requires_grad_(), k, v)             # training: SDPA, whose backward recomputes the scores
    assert calls == [torch.bfloat16]
    monkeypatch.setattr(attn, "MODE", "sdpa")
    with torch.no_grad():
        attn.attention(*tensors(64, 77, 40, torch.bfloat16))
    assert calls == [torch.bfloat16]
