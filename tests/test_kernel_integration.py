"""The cache's attention through the Triton kernels (CPU interpreter, in a fresh process so the
interpreter is chosen before Triton is imported): equal to SDPA over the decoded cache, left padding
included, with the kernel path actually taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys, torch
    sys.path.insert(0, {tests!r})
    import tqcache
    from tqcache import TurboQuantCache, parse_scheme
    from test_cache import llama, padded_batch

    model = llama(head_dim=64, heads=8, kv_heads=2, layers=2)
    ids, mask = padded_batch(T=40)
    feed = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(7))

    def run(impl, dense, scheme):
        model.config._attn_implementation = impl
        cfg = parse_scheme(scheme)
        # No query-aware key scaling here: the dense path cannot observe queries, so it would calibrate differently.
        cfg = cfg.replace(key=dataclasses.replace(cfg.key, channel_scale=False), window=8, sinks=2)
        cache = TurboQuantCache(model.config, cfg, dense=dense)
        out, m = [], mask
        with torch.no_grad():
            out.append(model(ids, attention_mask=m, past_key_values=cache).logits[:, -1])
            for t in range(5):  # teacher-forced: both runs see the same tokens
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                out.append(model(feed[:, t : t + 1], attention_mask=m, past_key_values=cache).logits[:, -1])
        return torch.stack(out), cache

    res = {{}}
    for scheme in ("turbo4", "k4v3"):
        a, ca = run("tqcache", False, scheme)
        b, _ = run("sdpa", True, scheme)
        res[scheme] = {{"max_diff": (a - b).abs().max().item(), "paths": ca.layers[0].paths}}
    print(json.dumps(res))
    """
)


def test_cache_attention_through_interpreted_kernels_matches_decoded_cache():
    tests = str(Path(__file__).parent)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(Path(tests).parent / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for scheme, r in res.items():
        assert r["paths"].get("kernel", 0) == 5, (scheme, r)  # every decode step read the compressed part via the kernel
        assert r["max_diff"] < 1e-4, (scheme, r)
