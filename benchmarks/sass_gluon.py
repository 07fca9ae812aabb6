"""SASS of the decode (Gluon) and encode kernels without a GPU: instruction counts of their main loops per scheme.

Triton's bundled ptxas compiles for sm_90 on the CPU machine once the runtime is told which GPU to target: a
stand-in driver reports ``GPUTarget("cuda", 90, 32)``, ``_gluon_decode_kernel.warmup`` compiles the plan's real
arguments (CPU tensors stand in for the cache), and ``nvdisasm`` prints the SASS. The loop is the longest span
between a backward branch and its label. The counts match the H100's compiled kernel (turbo3 893, turbo4 795 per
32-token block at v17), so a lookup change can be counted before any device time is spent (docs/kernel-notes.md,
v18).

    python benchmarks/sass_gluon.py turbo3 turbo4          # head_dim 128
    python benchmarks/sass_gluon.py --d 64 turbo3
    python benchmarks/sass_gluon.py --module lab/variant.py turbo3   # a modified copy of decode_gluon.py
    python benchmarks/sass_gluon.py --encode turbo3               # the encode kernel (values; --module: encode.py)

The encode kernel is compiled the same way from the arguments ``encode_into`` would launch (its launcher is
swapped for one that records them; 4096 tokens × 8 heads of bf16 values, or ``--key`` calibrated keys), with what
the launcher decides differently on a GPU put back: the ±1 rotation in bf16 and one bf16 piece (the CPU keeps
fp32 and tf32x3 products; counts before v21 were of that form), the level search's PTX, the scaled keys' bf16x2
multiply or folded scales, and the tile through registers. Prints the loop's instructions per 64-token tile, registers and
shared memory.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _Sm90:
    """Just enough of a driver for Triton to compile (never launch) for an H100."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def loop_counts(sass: list[str]) -> tuple[int, collections.Counter]:
    """Instructions of the longest backward-branch loop, and their opcodes."""
    best = (0, 0, 0)
    for i, line in enumerate(sass):
        m = re.search(r"BRA `\(\.L_x_(\d+)\)", line)
        if not m:
            continue
        j = next((k for k, x in enumerate(sass) if x.startswith(f".L_x_{m.group(1)}:")), None)
        if j is not None and j < i:
            best = max(best, (sum(1 for x in sass[j:i + 1] if x.strip().startswith("/*")), j, i))
    n, j, i = best
    ops = collections.Counter(re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", x).split()[0].split(".")[0]
                              for x in sass[j:i + 1] if x.strip().startswith("/*"))
    return n, ops


def compile_scheme(g, scheme: str, d: int, pdl: bool = False):
    import bench_attention as ba
    from tqcache.kernels import attention as att

    dev = torch.device("cpu")
    B, Hkv, T, G = 8, 8, 4096, 4
    kc, vc = ba.codecs_for(scheme, dev)
    kp, vp = ba.random_packed(kc, B, Hkv, T, dev), ba.random_packed(vc, B, Hkv, T, dev)
    _a, _u, lvk, _lvv, lutk, lutv, _ok, _seg = att._matrices(kc, vc, dev, torch.float16, gluon=True)
    qk = torch.empty(B, Hkv, G, _a.shape[-1], dtype=torch.float16)
    kf, vf = kp.fields, vp.fields
    assemble, meta = g.gluon_plan(qk, kf["codes"], kf["norms"], vf["codes"], vf["norms"], lutk, lutv, k_codec=kc,
                                  v_codec=vc, M=G, Hkv=Hkv, G=G, d=d, block_n=16 if d > 128 else 32, stages=2,
                                  lvk=lvk, qjl=None, given=(False, False, False, False))
    meta = dict(meta, PDL=pdl, launch_pdl=pdl)
    splits = 49
    pacc = torch.empty(B * Hkv * splits * G * d)
    pm = torch.empty(B * Hkv * splits * G)
    dummy = torch.empty(4, dtype=torch.int32)
    args = assemble(qk, kf["codes"], kf["norms"], vf["codes"], vf["norms"], None, None, dummy, dummy, dummy, pacc,
                    pm, torch.empty_like(pm), T, None, splits)
    return g._gluon_decode_kernel.warmup(*args, grid=(1,), **meta)


def compile_encode(enc, scheme: str, d: int, key: bool = False):
    import bench_encode as be

    seen = {}

    class _Record:  # stands in for the encode kernel's launcher: keeps the arguments, launches nothing
        def __call__(self, key, grid, args, meta):
            seen["args"], seen["meta"] = list(args), dict(meta)

    be.D = d
    x = (torch.randn(1, 8, 4096, d) * (0.5 + 3 * torch.rand(d))).to(torch.bfloat16)
    codec = dict(be.real_codecs(scheme, x))["key" if key else "value"]  # (calibrated as the cache does)
    fields = {n: torch.zeros(1, 8, 4096, w, dtype=dt) for n, (w, dt) in codec.field_widths().items()}
    launcher, enc._ENCODE = enc._ENCODE, _Record()
    try:
        enc.encode_into(codec, x, fields, 0, exact=False)  # (the GPU's arithmetic)
    finally:
        enc._ENCODE = launcher
    args, meta = seen["args"], seen["meta"]
    # What encode_into decides on a GPU (see its launcher): args[4] is the rotation, args[5] its post-scales,
    # args[7] the reciprocal channel scales. FOLD (power-of-two key scales): the rotation is [Hkv, D, D0], each head's
    # scaled by its 1/s; its first head divided by those scales gives the plain rotation back (exactly).
    R, cs = args[4], args[7]
    fold = bool(meta.get("FOLD"))
    R0 = R[0] / cs[0][:, None] if fold else R
    mags = R0.abs()[R0 != 0]
    if (meta["HOIST"] or meta.get("BFLY")) and bool(torch.all(mags == mags[0])):
        args[4] = (torch.sign(R) * cs.expand(R.shape[0], -1)[:, :, None] if fold else torch.sign(R)).to(torch.bfloat16)
        args[5] = torch.tensor([float(mags[0])] * 2)
        meta["PIECES"] = 1 if (codec.bf16_working or not codec.use_channel_scale) else 3
    for s in ("0", "1"):
        if meta.get("G" + s):
            meta["GASM" + s] = enc.grid_asm(meta["G" + s], bool(codec.qjl))
    meta["CS_MUL16"] = bool(codec.bf16_working and meta["PIECES"] == 1 and torch.equal(cs, cs.to(torch.bfloat16).float())
                            and (meta.get("LOCAL") or not (meta.get("G0") or meta.get("G1")))) or bool(
        meta.get("BFLY") and not codec.use_channel_scale and meta["PIECES"] == 1)  # (BFLY: the sign multiply)
    if "X_REGS" in enc._encode_kernel.arg_names:
        meta["X_REGS"] = bool((meta["HOIST"] or meta.get("BFLY")) and meta["PIECES"] == 1
                              and (fold or not codec.use_channel_scale))
    if meta.get("BFLY"):  # x stages on the GPU (encode_into)
        meta["num_stages"] = 3 if meta.get("LOCAL") else 2
    return enc._encode_kernel.warmup(*args, grid=(1,), **meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("schemes", nargs="+")
    ap.add_argument("--d", type=int, default=128, help="head_dim (the codecs of bench_attention at this width)")
    ap.add_argument("--module", default=None, help="a copy of decode_gluon.py (or encode.py) to compile instead")
    ap.add_argument("--encode", action="store_true", help="the encode kernel (values) instead of the decode kernel")
    ap.add_argument("--key", action="store_true", help="with --encode: the key codec (calibrated channel scales)")
    ap.add_argument("--pdl", action="store_true", help="the decode kernel as programmatic dependent launch runs it")
    args = ap.parse_args(argv)
    if args.d != 128:
        import bench_attention as ba

        ba.D = args.d
    driver.set_active(_Sm90())
    from tqcache.kernels import attention as att

    g = importlib.import_module("tqcache.kernels.encode") if args.encode else att._gluon_module()
    if args.module:
        spec = importlib.util.spec_from_file_location("tqcache.kernels.sass_variant", args.module)
        g = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(g)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    for scheme in args.schemes:
        ck = compile_encode(g, scheme, args.d, args.key) if args.encode else compile_scheme(g, scheme, args.d, args.pdl)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        lines = sass.splitlines()
        n, ops = loop_counts(lines)
        total = sum(1 for x in lines if x.strip().startswith("/*") and "*/" in x)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(ck.asm["cubin"])
            f.flush()
            res = subprocess.run([os.path.join(os.path.dirname(nvdisasm), "cuobjdump"), "-res-usage", f.name],
                                 capture_output=True, text=True).stdout
        regs = re.search(r"REG:(\d+)", res)
        print(f"{scheme:10s} d={args.d}{' encode' if args.encode else ''}{' keys' if args.key else ''}: "
              f"{total} instructions, {regs.group(1) if regs else '?'} registers, {ck.metadata.shared} B shared, "
              f"loop {n}: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
