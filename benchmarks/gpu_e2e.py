"""End-to-end check of the cache on a GPU: a random-weight Llama (GQA 32/8, head_dim 128, 2 layers) generates
with TurboQuantCache through the "tqcache" attention; the compressed path must match SDPA over the decoded
cache, and the kernel path must be the one that ran. Prints a short table; writes JSON to $OUT if set."""

import json
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tqcache
from tqcache import TurboQuantCache, parse_scheme


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="turbo4,k4v3,turbo3.5,k5v3,turbo4-qjl")
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens per sequence (batch 2); from 16K on the "
                    "decode steps fill the H100 and chain their launches (attention.gluon_config's PDL)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=65536)
    cfg._attn_implementation = "tqcache"
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, a.prompt), device="cuda")
    feed = torch.randint(0, 1000, (2, 16), device="cuda")
    rows = []
    for scheme in a.schemes.split(","):
        for cs in (False, True):
            c = parse_scheme(scheme)
            import dataclasses
            c = c.replace(key=dataclasses.replace(c.key, channel_scale=cs))
            outs = {}
            for impl, dense in (("tqcache", False), ("sdpa", True)):
                model.config._attn_implementation = impl
                cache = TurboQuantCache(model.config, c, dense=dense)
                torch.cuda.synchronize(); t = time.perf_counter()
                with torch.no_grad():
                    o = model(ids, past_key_values=cache)
                    logits = [o.logits[:, -1].float()]
                    for t in range(16):  # teacher-forced: greedy feedback would let noise pick other tokens
                        o = model(feed[:, t : t + 1], past_key_values=cache)
                        logits.append(o.logits[:, -1].float())
                torch.cuda.synchronize()
                outs[impl] = (torch.stack(logits), time.perf_counter() - t, cache)
            model.config._attn_implementation = "tqcache"
            a, b = outs["tqcache"][0], outs["sdpa"][0]
            rel = ((a - b).norm() / b.norm()).item()
            paths = {}
            for L in outs["tqcache"][2].layers:
                for k, v in L.paths.items():
                    paths[k] = paths.get(k, 0) + v
            rows.append(dict(scheme=scheme, channel_scale=cs, rel_err_vs_decoded=rel, paths=paths,
                             seconds=outs["tqcache"][1], bits=outs["tqcache"][2].memory().bits_per_element))
            print(rows[-1], flush=True)
    info = tqcache.kernels.info()
    print("fallbacks:", info.get("fallbacks"))
    chained = sorted(k for k, c in info.get("launch_configs", {}).items() if c.get("PDL"))
    print(f"decode launch configurations chained by PDL: {len(chained)} of {len(info.get('launch_configs', {}))}",
          chained[:4])
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_e2e.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows, "kernels": info}, f, indent=1, default=str)
    print(f"{'scheme':10s} {'cs':5s} {'rel err':>9s}  paths")
    for r in rows:
        print(f"{r['scheme']:10s} {str(r['channel_scale']):5s} {r['rel_err_vs_decoded']:9.2e}  {r['paths']}")


if __name__ == "__main__":
    main()
