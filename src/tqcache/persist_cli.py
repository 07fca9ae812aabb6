"""`tqcache import-dense`: compress a dense KV cache saved as safetensors into a tqcache cache file.

Example::

    tqcache import-dense prompt_kv.safetensors prompt.tqc --model smollm2 --scheme turbo4

The input holds ``layers.{i}.keys`` / ``layers.{i}.values`` ``[B, H_kv, T, head_dim]`` for every layer (see
docs/persistence.md); the output is read back with :func:`tqcache.load_cache`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="dense cache: safetensors with layers.{i}.keys / layers.{i}.values [B, H_kv, T, head_dim]")
    p.add_argument("output", help="tqcache cache file to write")
    p.add_argument("--model", default="smollm2", help="bundled model (smollm2, gemma3) or a local model folder")
    p.add_argument("--scheme", default="turbo4", help="cache scheme: turbo4, turbo3.5, k4v3, affine4, none, ...")
    p.add_argument("--window", type=int, default=None, help="full-precision recent window (default: the scheme's)")
    p.add_argument("--sinks", type=int, default=None, help="full-precision attention-sink tokens (default: the scheme's)")
    p.add_argument("--flush", type=int, default=None,
                   help="decode-time overflow compressed this many tokens at a time (default: the scheme's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def run(args) -> int:
    from safetensors import safe_open

    from . import models
    from .config import parse_scheme
    from .persist import import_dense

    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        raise FileNotFoundError(f"dense cache file {src} does not exist")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    cfg = parse_scheme(args.scheme)
    changes = {k: v for k, v in (("window", args.window), ("sinks", args.sinks), ("flush", args.flush)) if v is not None}
    if changes:
        cfg = cfg.replace(**changes)
    # Load the model in the dense tensors' dtype: the file's fingerprint then matches the model that uses it.
    try:
        with safe_open(str(src), framework="pt", device="cpu") as f:
            names = list(f.keys())
            dtype = f.get_slice(names[0]).get_dtype() if names else "F32"
    except Exception as e:  # noqa: BLE001 -- safetensors' parser errors share no base class
        raise ValueError(f"{src} is not a readable safetensors file: {e}") from e
    import torch

    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(dtype, torch.float32)
    model, _ = models.load(args.model, dtype=torch_dtype, device="cpu", attn_implementation="sdpa")
    import_dense(src, out, model, cfg, overwrite=args.overwrite)
    in_size, out_size = src.stat().st_size, out.stat().st_size
    print(f"wrote {out}: scheme {cfg.name} (window {cfg.window}, sinks {cfg.sinks}), model {args.model}; "
          f"{out_size / 2**20:.2f} MiB from {in_size / 2**20:.2f} MiB dense ({in_size / max(out_size, 1):.1f}x smaller)")
    return 0
