"""The cache on the real bundled models (installed and converted on first use; see tqcache.models).

These are the tests that random weights cannot replace: real keys have outlier channels and large norms.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import tqcache
from tqcache import TurboQuantCache, models, parse_scheme

pytestmark = pytest.mark.slow

TEXT = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up "
    "any book but the Baronetage; there he found occupation for an idle hour, and consolation in a distressed "
    "one; there his faculties were roused into admiration and respect, by contemplating the limited remnant of "
    "the earliest patents; there any unwelcome sensations, arising from domestic affairs changed naturally into "
    "pity and contempt as he turned over the almost endless creations of the last century; and there, if every "
    "other leaf were powerless, he could read his own history with an interest which never failed."
)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
    torch.manual_seed(0)
    model, tok = models.load(request.param, dtype=torch.float32, device="cpu", attn_implementation="tqcache")
    return request.param, model, tok


def _batch(tok, n_tokens):
    ids = tok(TEXT, return_tensors="pt").input_ids[0, :n_tokens]
    short = ids[: n_tokens - 7]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = torch.stack([ids, torch.cat([torch.full((7,), pad), short])])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    return batch, mask


def _run(model, cache, ids, mask, steps, feed):
    """Prefill then feed ``feed`` tokens (teacher forcing); returns log-probs of every step ``[steps+1, B, V]``."""
    out = []
    with torch.no_grad():
        o = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        out.append(o.logits[:, -1].float().log_softmax(-1))
        for t in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            o = model(feed[:, t : t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            out.append(o.logits[:, -1].float().log_softmax(-1))
    return torch.stack(out)


def test_none_scheme_is_identical_to_dynamic_cache_on_real_models(real):
    name, model, tok = real
    ids, mask = _batch(tok, 72)
    feed = torch.randint(100, 5000, (2, 64), generator=torch.Generator().manual_seed(1))
    ref = _run(model, DynamicCache(config=model.config), ids, mask, 64, feed)
    got = _run(model, TurboQuantCache(model.config, "none"), ids, mask, 64, feed)
    assert torch.equal(ref, got), f"{name}: scheme none differs from DynamicCache"


def test_turbo4_decode_stays_close_to_full_precision(real):
    """The default turbo4 preset with a 16-token window (so most of the context is read compressed) on real
    prose: 48 teacher-forced decode steps after a 200-token prompt."""
    name, model, tok = real
    text = (Path(tqcache.__file__).parent / "data" / "persuasion.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids
    prompt, cont = ids[:, :200], ids[:, 200:248]
    steps = cont.shape[1]
    mask = torch.ones_like(prompt)
    ref = _run(model, DynamicCache(config=model.config), prompt, mask, steps, cont)
    cache = TurboQuantCache(model.config, parse_scheme("turbo4").replace(window=16))
    got = _run(model, cache, prompt, mask, steps, cont)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert cache.memory().compressed_tokens > 0
    print(f"{name}: turbo4 window 16: KL {kl:.4f}, top-1 {top1:.3f}")
    assert kl < 0.03 and top1 > 0.9, f"{name}: KL {kl:.4f}, top-1 {top1:.3f}"
    assert kl > 0, "nothing was compressed"
