"""Does our attention kernel compile with every Triton release that a supported PyTorch (2.4 on) may bring? Each
version is installed on its own (pip --target, no dependencies) and compiles the kernel for Ampere (sm_80) and Hopper
(sm_90) with Triton's own compiler, on a machine without a GPU: every head width, float16, bfloat16 and float32, and
every tile in minicontrol/tuning.py's table. Compiling is not running: what the code does on a GPU is for
bench/gpu_check.py.

    python bench/triton_versions.py 3.0.0 3.1.0 3.2.0 3.3.1 3.4.0 3.5.1 3.6.0 3.7.0 3.8.0 3.9.0
"""
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_kernel(d, dtype, tile, capability):
    """One compile at this head width, dtype, tile and compute capability; q, k, v laid out as the UNet passes them.
    The arguments are specialised as Triton's launcher does: pointers and ints divisible by 16 marked so, ints equal
    to 1 made constants. Triton's API for that changed twice: 3.0-3.1, 3.2, and 3.3 on."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from minicontrol.flash import _flash_fwd, kernel_args, split_width

    heads = {40: 8, 64: 5, 80: 8, 160: 8}[d]
    make = lambda: torch.zeros(2, 1024, heads * d, dtype=dtype).view(2, 1024, heads, d).transpose(1, 2)
    q, k, v = make(), make(), make()
    args, meta = kernel_args(q, k, v, torch.empty_like(q))
    block_m, block_n, warps, stages, pad = tile
    d0, d1 = split_width(d, pad)
    values = dict(zip(_flash_fwd.arg_names, args), **dict(meta, UPCAST=False), BLOCK_M=block_m, BLOCK_N=block_n,
                  D0=d0, D1=d1)
    pointer = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    types, constants, div16, one = {}, {}, [], []
    for p in _flash_fwd.params:
        x = values[p.name]
        if p.is_constexpr or (type(x) is int and x == 1):
            constants[p.name] = x
            one += [] if p.is_constexpr else [p.num]
        else:
            types[p.name] = pointer[x.dtype] if torch.is_tensor(x) else "fp32" if isinstance(x, float) else "i32"
            if torch.is_tensor(x) or x % 16 == 0:
                div16.append(p.num)
    target = GPUTarget("cuda", capability, 32)
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:                        # 3.3 on
        from triton.backends.nvidia.compiler import CUDABackend
        signature = {p.name: types.get(p.name, "constexpr") for p in _flash_fwd.params}
        source = ASTSource(_flash_fwd, signature, {(_flash_fwd.arg_names.index(n),): x for n, x in constants.items()},
                           {(i,): CUDABackend.parse_attr("D") for i in div16})
    else:
        try:                                                                                    # 3.0, 3.1
            from triton.compiler import AttrsDescriptor
            attrs = AttrsDescriptor(tuple(div16), tuple(one))
        except ImportError:                                                                     # 3.2
            from triton.compiler.compiler import make_backend
            attrs = make_backend(target).get_attrs_descriptor(_flash_fwd.params,
                                                              [values[p.name] for p in _flash_fwd.params])
        source = ASTSource(_flash_fwd, types, constants, attrs)
    kernel = triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})
    return len(re.findall(r"\b(?:wgmma|mma\.sync)", kernel.asm["ptx"]))


def compile_all():
    """Prints {"version": ..., "cases": n, "failures": [...]} as JSON."""
    import torch
    import triton
    sys.path.insert(0, ROOT)
    from minicontrol.tuning import TILES
    failures, cases = [], 0
    for capability in (80, 90):
        for d in (40, 64, 80, 160):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for tile in TILES.get(d, []):
                    cases += 1
                    try:
                        tensor_core = compile_kernel(d, dtype, tile, capability)
                        if dtype != torch.float32 and tensor_core == 0:
                            failures.append(f"sm_{capability} d={d} {dtype} {tile}: no tensor-core instruction")
                    except Exception as e:
                        lines = [ln for ln in str(e.__cause__ or e).splitlines() if ln.strip(" ^")]
                        why = (lines or [""])[-1].strip()[:160]            # the reason: the message's last line
                        failures.append(f"sm_{capability} d={d} {dtype} {tile}: {type(e).__name__}: {why}")
    print(json.dumps({"version": triton.__version__, "cases": cases, "failures": failures}))


def main(versions):
    print("| Triton | kernels compiled (sm_80 and sm_90) | failures |\n|---|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for version in versions:
            where = os.path.join(tmp, version)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", where,
                            f"triton=={version}"], check=True, capture_output=True)
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["PYTHONPATH"] = where                      # this Triton before the one installed beside torch
            res = subprocess.run([sys.executable, __file__, "--compile"], capture_output=True, text=True, env=env)
            if res.returncode:
                print(f"| {version} | - | {res.stderr.strip().splitlines()[-1][:200]} |", flush=True)
                continue
            out = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"| {out['version']} | {out['cases'] - len(out['failures'])} of {out['cases']} | "
                  f"{'; '.join(out['failures']) or 'none'} |", flush=True)


if __name__ == "__main__":
    compile_all() if sys.argv[1:] == ["--compile"] else main(sys.argv[1:])
