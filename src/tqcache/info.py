"""`tqcache info`: the environment and the kernels' state (GPU, Triton, self-tests, launch configs)."""

from __future__ import annotations

import argparse
import json
import platform

import torch

__all__ = ["add_arguments", "run", "collect"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--probe", action="store_true",
                   help="run the kernels' self-tests now on small shapes (GPU only) before reporting")


def collect(probe: bool = False) -> dict:
    """A dict describing versions, the device and what the kernels report (``tqcache.kernels.info()``)."""
    import transformers

    from . import __version__

    report = {
        "tqcache": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        report["gpu"] = {"name": p.name, "sm_count": p.multi_processor_count,
                         "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
    try:
        from . import kernels

        if probe and torch.cuda.is_available():
            report["self_test"] = kernels.self_test(torch.device("cuda"))
        report["kernels"] = kernels.info()
    except ImportError as e:
        report["kernels"] = {"error": f"kernels not importable: {e}"}
    return report


def run(args) -> int:
    report = collect(probe=args.probe)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0
