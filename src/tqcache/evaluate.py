"""Fidelity of cache schemes against full precision (DESIGN §6): ``tqcache eval``.

Protocol, per model and text:

1. Tokenize the text; take ``P + T + 1`` tokens.
2. **Prefill** the first ``P`` tokens in one forward pass with the method's cache, so the prompt is stored
   (and quantized) exactly as it would be in real use.
3. **Teacher-force** the next ``T`` tokens one at a time. Step ``i`` feeds token ``P + i`` and yields the
   next-token distribution ``q_i`` for token ``P + i + 1``.
4. The same with a full-precision ``DynamicCache`` gives ``p_i`` (computed once per model and text and
   reused for every scheme). Metrics over the ``T`` steps:

   - mean ``KL(p_i ‖ q_i)`` in nats;
   - top-1 agreement: % of steps where ``argmax q_i == argmax p_i``;
   - perplexity of the teacher-forced tokens under the method, and Δperplexity % against the reference.

Bits are reported three ways: bits per element of the compressed part (codes + every norm, scale, zero and
sign), the number of full-precision tokens per layer at the end of the run (recent window, sinks), and the
total bits per cached element counting those tokens at 16 bits, at the measured length ``P + T``.

Python use::

    >>> from tqcache.evaluate import run_fidelity                                     # doctest: +SKIP
    >>> rows = run_fidelity(["smollm2"], ["none", "turbo4", "quanto4"], prefill=512, steps=256)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path

import torch

from .config import CacheConfig, parse_scheme

__all__ = [
    "DEFAULT_SCHEMES",
    "FULL_SCHEMES",
    "Method",
    "Reference",
    "StepMetrics",
    "ablation_configs",
    "compare_logprobs",
    "default_text",
    "format_table",
    "load_text",
    "make_method",
    "reference_run",
    "run_method",
    "run_fidelity",
    "save_results",
    "teacher_force",
]

#: Default of ``tqcache eval`` (kept short: each scheme is T decode steps on CPU).
DEFAULT_SCHEMES = ("none", "turbo4", "turbo3.5", "turbo3", "turbo2.5", "k4v3")
#: ``--schemes all``: our presets, the affine baseline and the peers.
FULL_SCHEMES = (
    "none", "turbo4", "turbo3.5", "turbo3", "turbo2.5", "k4v3", "k3.25v3", "k2.25v2", "k8v4", "affine4", "affine2",
    "quanto4", "quanto2", "hqq4", "hqq2", "quanto4-a-1", "hqq4-a1", "quanto4-r0", "hqq4-r0",
)  # fmt: skip
DEFAULT_MODELS = ("smollm2",)
DEFAULT_TEXT_NAME = "persuasion.txt"


# ----------------------------------------------------------------------------------------------- text
def default_text() -> str:
    """The bundled public-domain text (Jane Austen, *Persuasion*, chapters 1–4; see data/SOURCES.md)."""
    return resources.files("tqcache").joinpath("data", DEFAULT_TEXT_NAME).read_text(encoding="utf-8")


def load_text(path: "str | os.PathLike | None" = None) -> str:
    if path is None:
        return default_text()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    return p.read_text(encoding="utf-8", errors="replace")


def tokenize(tok, text: str, n: int) -> torch.Tensor:
    """The first ``n`` token ids of ``text`` as ``[1, n]`` (special tokens as the tokenizer adds them)."""
    ids = tok(text, return_tensors="pt").input_ids
    if ids.shape[1] < n:
        raise ValueError(
            f"the text has {ids.shape[1]} tokens, the protocol needs {n} (prefill + steps + 1): use a longer "
            "--text or smaller --prefill/--steps"
        )
    return ids[:, :n]


# -------------------------------------------------------------------------------------------- metrics
@dataclasses.dataclass
class StepMetrics:
    """Per-step metrics of one method against the reference (each a list of length T)."""

    kl: list[float] = dataclasses.field(default_factory=list)
    agree: list[bool] = dataclasses.field(default_factory=list)
    nll: list[float] = dataclasses.field(default_factory=list)

    def add(self, ref_logp: torch.Tensor, logp: torch.Tensor, target: int) -> None:
        kl, agree, nll = compare_logprobs(ref_logp[None], logp[None], torch.tensor([target]))
        self.kl.append(float(kl[0]))
        self.agree.append(bool(agree[0]))
        self.nll.append(float(nll[0]))

    def summary(self, ref_nll: Sequence[float] | None = None) -> dict:
        n = len(self.kl)
        out = {
            "kl_mean": sum(self.kl) / n,
            "kl_median": float(torch.tensor(self.kl).median()),
            "kl_max": max(self.kl),
            "top1": 100.0 * sum(self.agree) / n,
            "ppl": math.exp(sum(self.nll) / n),
        }
        if ref_nll is not None:
            ref_ppl = math.exp(sum(ref_nll) / len(ref_nll))
            out["ppl_ref"] = ref_ppl
            out["dppl"] = 100.0 * (out["ppl"] / ref_ppl - 1.0)
        return out


def compare_logprobs(
    ref_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KL(ref ‖ method), top-1 agreement and the method's NLL of ``targets``.

    Args:
        ref_logp, logp: ``[N, V]`` log-probabilities (``log_softmax`` outputs).
        targets: ``[N]`` token ids.

    Returns:
        ``kl [N]`` (nats, float64), ``agree [N]`` (bool), ``nll [N]`` (float64).

    Example::

        >>> p = torch.log_softmax(torch.tensor([[2.0, 0.0]]), -1)
        >>> kl, agree, nll = compare_logprobs(p, p, torch.tensor([0]))
        >>> float(kl[0]), bool(agree[0])
        (0.0, True)
    """
    ref = ref_logp.double()
    m = logp.double()
    # Terms with p = 0 contribute 0 (exp(-inf) * anything finite); guard -inf - -inf = nan.
    diff = torch.where(torch.isneginf(ref), torch.zeros_like(ref), ref - m)
    kl = (ref.exp() * diff).sum(-1)
    agree = ref_logp.argmax(-1) == logp.argmax(-1)
    nll = -m.gather(-1, targets.view(-1, 1).to(m.device)).squeeze(-1)
    return kl, agree, nll


# --------------------------------------------------------------------------------------------- driver
def teacher_force(
    model, ids: torch.Tensor, cache, prefill: int, steps: int, on_step: Callable[[], None] | None = None
) -> Iterable[torch.Tensor]:
    """Yield the ``[V]`` float32 log-probabilities of steps ``0..steps-1`` (DESIGN §6, steps 2–3).

    ``ids`` is ``[1, ≥ prefill + steps]``; ``cache`` any transformers ``Cache`` (it is filled in place).
    """
    if ids.shape[1] < prefill + steps:
        raise ValueError(f"need {prefill + steps} tokens, got {ids.shape[1]}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    with torch.inference_mode():
        model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i in range(steps):
            out = model(input_ids=ids[:, prefill + i : prefill + i + 1], past_key_values=cache, use_cache=True)
            if on_step is not None:
                on_step()
            yield torch.log_softmax(out.logits[0, -1].float(), dim=-1)


@dataclasses.dataclass
class Reference:
    """The full-precision run of one model on one text: per-step log-probabilities and target NLL."""

    logprobs: torch.Tensor  # [T, V] float32
    targets: torch.Tensor  # [T]
    nll: list[float]
    wall_s: float

    @property
    def ppl(self) -> float:
        return math.exp(sum(self.nll) / len(self.nll))


def reference_run(model, ids: torch.Tensor, prefill: int, steps: int, on_step=None) -> Reference:
    """Run the protocol with a full-precision ``DynamicCache`` (the reference of every scheme)."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    rows = list(teacher_force(model, ids, DynamicCache(config=model.config), prefill, steps, on_step))
    logprobs = torch.stack(rows).cpu()
    targets = ids[0, prefill + 1 : prefill + steps + 1].cpu()
    nll = (-logprobs.double().gather(-1, targets.view(-1, 1)).squeeze(-1)).tolist()
    return Reference(logprobs, targets, nll, time.perf_counter() - t0)


@dataclasses.dataclass
class Method:
    """Something to measure: a name, a cache factory and a bits report read off the filled cache.

    ``bits(cache)`` returns ``(bits_per_element, window_tokens, total_bits)``: compressed bits per element
    with all metadata, full-precision tokens per layer at the end, and bits per cached element counting
    those tokens at 16 bits.
    """

    name: str
    family: str  # "tqcache" | "peer"
    make_cache: Callable[[object], object]
    bits: Callable[[object], tuple[float, float, float]]
    config: dict = dataclasses.field(default_factory=dict)


def _tq_bits(cache) -> tuple[float, float, float]:
    mem = cache.memory()
    n_layers = max(1, sum(1 for layer in cache.layers if layer.is_initialized))
    tokens = mem.compressed_tokens + mem.fp_tokens
    if not mem.compressed_tokens:
        return 16.0, mem.fp_tokens / n_layers, 16.0
    f = mem.fp_tokens / tokens if tokens else 0.0
    bpe = mem.bits_per_element
    return bpe, mem.fp_tokens / n_layers, bpe * (1 - f) + 16.0 * f


def _config_dict(cfg: CacheConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["fp_layers"] = list(d["fp_layers"])
    return d


def make_method(scheme: "str | CacheConfig", name: str | None = None) -> Method:
    """A :class:`Method` for a tqcache scheme (string or config) or a peer name (``quanto4``, ``hqq2``...)."""
    from . import peers

    if isinstance(scheme, str) and peers.is_peer(scheme):
        spec = peers.parse_peer(scheme)

        def bits(cache):
            m = peers.peer_memory(cache)
            return m.bits_per_element, m.window_tokens, m.bits_per_element_total

        return Method(
            name or scheme,
            "peer",
            lambda model: peers.make_peer_cache(model.config, spec),
            bits,
            dataclasses.asdict(spec),
        )
    cfg = parse_scheme(scheme)

    def make(model):
        from .cache import TurboQuantCache

        return TurboQuantCache(model.config, cfg)

    return Method(name or cfg.name, "tqcache", make, _tq_bits, _config_dict(cfg))


def run_method(model, ids: torch.Tensor, ref: Reference, method: Method, prefill: int, steps: int, on_step=None) -> dict:
    """Run one method through the protocol and compare it with ``ref``; returns one result row."""
    cache = method.make_cache(model)
    acc = StepMetrics()
    t0 = time.perf_counter()
    for i, logp in enumerate(teacher_force(model, ids, cache, prefill, steps, on_step)):
        acc.add(ref.logprobs[i], logp.cpu(), int(ref.targets[i]))
    wall = time.perf_counter() - t0
    bpe, window, total = method.bits(cache)
    row = {
        "scheme": method.name,
        "family": method.family,
        "bits_per_element": bpe,
        "window_tokens": window,
        "total_bits": total,
        **acc.summary(ref.nll),
        "wall_s": wall,
        "prefill": prefill,
        "steps": steps,
        "config": method.config,
    }
    return row


# ------------------------------------------------------------------------------------------ high level
def _load_model(name: str, dtype: torch.dtype, device: str):
    from . import models

    model, tok = models.load(name, dtype=dtype, device=device, attn_implementation="tqcache")
    model.eval()
    try:
        fp = models.fingerprint(model)
    except Exception:  # fingerprint is informational
        fp = None
    return model, tok, fp


def _progress(total: int, enabled: bool | None):
    """A tqdm bar on stderr; when stderr is not a terminal it is off (a plain line per scheme is printed)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)


def run_fidelity(
    models: Sequence[str] = DEFAULT_MODELS,
    schemes: Sequence["str | CacheConfig | Method"] = DEFAULT_SCHEMES,
    *,
    text: str | None = None,
    prefill: int = 512,
    steps: int = 256,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    loader: Callable[[str], tuple] | None = None,
) -> tuple[list[dict], dict]:
    """The whole protocol over ``models × schemes``; returns ``(rows, meta)``.

    ``schemes`` may mix scheme strings, :class:`CacheConfig` objects (named by their ``name``), peer names
    and ready :class:`Method` objects. Peers whose package is missing are skipped with a logged reason (a
    row with ``"skipped"`` set). ``loader(name) -> (model, tokenizer, fingerprint)`` replaces the bundled
    model loader (tests).
    """
    from . import peers

    text = default_text() if text is None else text
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    methods: list[Method] = []
    skipped: list[dict] = []
    for s in schemes:
        if isinstance(s, Method):
            methods.append(s)
            continue
        if isinstance(s, str) and peers.is_peer(s):
            why = peers.peer_available(peers.parse_peer(s).backend)
            if why:
                log(f"skipping peer {s}: {why}")
                skipped.append({"scheme": s, "family": "peer", "skipped": why})
                continue
        methods.append(make_method(s))
    loader = loader or (lambda name: _load_model(name, dtype, device))
    rows: list[dict] = []
    meta = {"models": {}, "prefill": prefill, "steps": steps, "skipped": skipped}
    bar = _progress(len(models) * (len(methods) + 1) * steps, progress)
    try:
        for model_name in models:
            t0 = time.perf_counter()
            model, tok, fp = loader(model_name)
            load_s = time.perf_counter() - t0
            ids = tokenize(tok, text, prefill + steps + 1)
            bar.set_description(f"{model_name}: reference")
            ref = reference_run(model, ids, prefill, steps, on_step=lambda: bar.update(1))
            meta["models"][model_name] = {
                "fingerprint": fp,
                "ppl_ref": ref.ppl,
                "reference_wall_s": ref.wall_s,
                "load_s": load_s,
                "vocab": int(ref.logprobs.shape[-1]),
                "num_layers": int(model.config.get_text_config(decoder=True).num_hidden_layers),
            }
            log(f"{model_name}: reference ppl {ref.ppl:.3f} ({ref.wall_s:.1f} s for {steps} steps)")
            for method in methods:
                bar.set_description(f"{model_name}: {method.name}")
                row = run_method(model, ids, ref, method, prefill, steps, on_step=lambda: bar.update(1))
                row["model"] = model_name
                rows.append(row)
                log(
                    f"{model_name:8s} {method.name:14s} bits {row['bits_per_element']:.3f} "
                    f"KL {row['kl_mean']:.5f} top1 {row['top1']:.1f}% ppl {row['ppl']:.3f} "
                    f"({row['dppl']:+.2f}%) {row['wall_s']:.1f} s"
                )
            del model, ref
    finally:
        bar.close()
    return rows, meta


# ------------------------------------------------------------------------------------------- reporting
_COLUMNS = (
    ("scheme", "scheme", "{}"),
    ("bits/elem", "bits_per_element", "{:.3f}"),
    ("fp tok", "window_tokens", "{:.0f}"),
    ("total bits", "total_bits", "{:.3f}"),
    ("mean KL", "kl_mean", "{:.5f}"),
    ("top-1 %", "top1", "{:.1f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("Δppl %", "dppl", "{:+.2f}"),
    ("wall s", "wall_s", "{:.1f}"),
)


def format_table(rows: Sequence[dict], markdown: bool = False, columns=_COLUMNS) -> str:
    """The results as a text (or Markdown) table, grouped by model.

    ``fp tok`` is the number of full-precision tokens per layer at the end of the run (recent window,
    sinks, full-precision layers); ``total bits`` counts them at 16 bits.
    """
    out = []
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r.get("model", "?"), []).append(r)
    for model, rs in by_model.items():
        cells = [[c[0] for c in columns]]
        for r in rs:
            cells.append([fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in columns])
        if markdown:
            out.append(f"**{model}**\n")
            out.append("| " + " | ".join(h for h in cells[0]) + " |")
            out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
            out.extend("| " + " | ".join(row) + " |" for row in cells[1:])
        else:
            out.append(f"== {model}")
            out.extend(text_table(cells))
        out.append("")
    return "\n".join(out)


def text_table(rows: list[list[str]]) -> list[str]:
    """Plain-text lines of a table: first column left-aligned, others right-aligned, a rule under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _environment() -> dict:
    import transformers

    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip() or None
    except Exception:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "commit": commit,
    }


def plot_kl_vs_bits(rows: Sequence[dict], path: "str | os.PathLike", title: str = "") -> Path:
    """PNG of mean KL (log scale) against compressed bits per element, one series per model, labelled.

    Rows with KL ≤ 0 (the ``none`` sanity row) have no place on a log axis and are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    models = list(dict.fromkeys(r.get("model", "?") for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for mi, model in enumerate(models):
        color = colors[mi % len(colors)]
        for family, marker in (("tqcache", "o"), ("peer", "s")):
            pts = [
                r for r in rows
                if r.get("model", "?") == model and r.get("family", "tqcache") == family
                and r.get("kl_mean", 0) > 0 and math.isfinite(r.get("bits_per_element", float("nan")))
            ]  # fmt: skip
            if not pts:
                continue
            label = f"{model} ({'tqcache' if family == 'tqcache' else 'peers'})"
            ax.scatter([r["bits_per_element"] for r in pts], [r["kl_mean"] for r in pts], color=color,
                       marker=marker, label=label, s=36, zorder=3, facecolors=color if family == "tqcache" else "none")  # fmt: skip
            for r in pts:
                ax.annotate(r["scheme"], (r["bits_per_element"], r["kl_mean"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=color)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (compressed part, all metadata counted)")
    ax.set_ylabel("mean KL(full precision ‖ method), nats")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "KV-cache fidelity: KL vs bits (open squares: peers)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_results(
    rows: Sequence[dict], meta: dict, out_dir: "str | os.PathLike", stem: str = "fidelity", plot: bool = True
) -> list[Path]:
    """Write ``<stem>.json`` (rows, meta, environment) and ``<stem>.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": _environment(), "meta": meta, "results": list(rows)}
    paths = [out / f"{stem}.json"]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if plot:
        paths.append(plot_kl_vs_bits(rows, out / f"{stem}.png"))
    return paths


# ------------------------------------------------------------------------------------------- ablations
def ablation_configs(base: str = "turbo3") -> list[tuple[str, str, CacheConfig]]:
    """The issue-5 sweep: ``(group, label, config)`` triples, each a one-field change of a preset.

    Groups: rotation kind, norm correction, QJL, K/V split, fractional split, window, sinks, full-precision
    first/last layers, per-channel key scaling. Bits are held fixed within each group (QJL on spends one of
    the bits on the sign sketch; the window group changes only the full-precision part). Every config compresses
    each token as it leaves the window (``flush=1``), as when docs/fidelity.md's ablation tables were measured, so
    ``w0`` means no full-precision token at all.
    """
    b = parse_scheme(base)

    def codec(cfg: CacheConfig, **kw) -> CacheConfig:
        return cfg.replace(key=dataclasses.replace(cfg.key, **kw), value=dataclasses.replace(cfg.value, **kw))

    def named(cfg: CacheConfig, label: str) -> CacheConfig:
        return cfg.replace(name=label)

    t4 = parse_scheme("turbo4")
    out: list[tuple[str, str, CacheConfig]] = [
        ("baseline", base, b),
        ("rotation", f"{base} haar", named(codec(b, rotation="haar"), f"{base} haar")),
        ("norm correction", f"{base} no-normcorr", named(codec(b, norm_correction=False), f"{base} no-normcorr")),
        ("qjl", f"{base} qjl", named(codec(b, qjl=True), f"{base} qjl")),
        ("kv split", "k4v3", parse_scheme("k4v3")),
        ("kv split", "k3v4", named(parse_scheme("k3v4"), "k3v4")),
        ("fractional", "turbo3.5 halves", parse_scheme("turbo3.5")),
        ("fractional", "turbo3.5 outliers", named(codec(parse_scheme("turbo3.5"), split="outliers"), "turbo3.5 outliers")),
        ("window", f"{base} w0", named(b.replace(window=0), f"{base} w0")),
        ("window", f"{base} w32", named(b.replace(window=32), f"{base} w32")),
        ("window", "turbo4 w0", named(t4.replace(window=0), "turbo4 w0")),
        ("sinks", f"{base} w0 s4", named(b.replace(window=0, sinks=4), f"{base} w0 s4")),
        ("fp layers", f"{base} fp0,-1", named(b.replace(fp_layers=(0, -1)), f"{base} fp0,-1")),
        ("channel scale", f"{base} chscale", named(b.replace(key=dataclasses.replace(b.key, channel_scale=True)), f"{base} chscale")),
        ("channel scale", "turbo4 w0 chscale", named(t4.replace(window=0, key=dataclasses.replace(t4.key, channel_scale=True)), "turbo4 w0 chscale")),
    ]  # fmt: skip
    return [(group, label, cfg.replace(flush=1)) for group, label, cfg in out]


def run_ablation(models: Sequence[str], base: str = "turbo3", **kw) -> tuple[list[dict], dict]:
    """Run :func:`ablation_configs` through :func:`run_fidelity`; rows carry their ``group``."""
    triples = ablation_configs(base)
    methods = [make_method(cfg, name=label) for _, label, cfg in triples]
    rows, meta = run_fidelity(models, methods, **kw)
    group = {label: g for g, label, _ in triples}
    for r in rows:
        r["group"] = group.get(r["scheme"], "")
    meta["ablation_base"] = base
    return rows, meta


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.add_argument("--models", default=None, help="comma-separated: smollm2, gemma3 or a model folder (default smollm2)")
    parser.add_argument(
        "--schemes",
        default=",".join(DEFAULT_SCHEMES),
        help="comma-separated schemes and peers (quanto4, hqq2, quanto4-r0, ...); 'all' = presets, affine and peers "
        f"(default {','.join(DEFAULT_SCHEMES)})",
    )
    parser.add_argument("--text", default=None, help="UTF-8 text file (default: bundled Austen, Persuasion ch. 1–4)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens, prefilled in one pass (default 512)")
    parser.add_argument("--steps", type=int, default=256, help="teacher-forced decode steps measured (default 256)")
    parser.add_argument("--out", default=None, help="directory for fidelity JSON + PNG (passkey/ablation JSON too)")
    parser.add_argument("--name", default=None, help="file stem under --out (default fidelity / fidelity_ablation / fidelity_passkey)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="force the progress bar on/off (default: on a TTY)")
    parser.add_argument("--ablate", action="store_true", help="run the ablation sweep instead of the scheme table")
    parser.add_argument("--ablate-base", default="turbo3", help="preset the ablations change one field of (default turbo3)")
    parser.add_argument("--passkey", action="store_true", help="run the passkey retrieval test instead")
    parser.add_argument("--lengths", default="1024,2048,4096,6144", help="passkey context lengths in tokens")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="passkey depths (fractions of the context)")
    parser.add_argument("--trials", type=int, default=1, help="passkey trials per length×depth (different keys)")
    parser.add_argument("--seed", type=int, default=0, help="passkey random seed")


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _expand_schemes(spec: str) -> list[str]:
    out: list[str] = []
    for s in _split(spec):
        if s == "all":
            out.extend(FULL_SCHEMES)
        elif s == "peers":
            from .peers import DEFAULT_PEERS

            out.extend(DEFAULT_PEERS)
        else:
            out.append(s)
    return list(dict.fromkeys(out))


def run(args) -> int:
    dtype = getattr(torch, args.dtype)
    text = load_text(args.text)
    models = _split(args.models) if args.models else list(DEFAULT_MODELS)
    if args.prefill < 1 or args.steps < 1:
        raise ValueError(f"--prefill and --steps must be positive, got {args.prefill}, {args.steps}")
    if args.passkey:
        from . import passkey

        return passkey.run_cli(args, models, dtype)
    common = dict(text=text, prefill=args.prefill, steps=args.steps, dtype=dtype, device=args.device, progress=args.progress)
    if args.ablate:
        rows, meta = run_ablation(models, base=args.ablate_base, **common)
        stem = args.name or "fidelity_ablation"
        cols = (("group", "group", "{}"),) + _COLUMNS
        print(format_table(rows, columns=cols))
    else:
        from .peers import is_peer

        schemes = _expand_schemes(args.schemes)
        for s in schemes:  # fail fast on a typo, before loading any model
            if not is_peer(s):
                parse_scheme(s)
        rows, meta = run_fidelity(models, schemes, **common)
        stem = args.name or "fidelity"
        print(format_table(rows))
        for sk in meta["skipped"]:
            print(f"skipped {sk['scheme']}: {sk['skipped']}")
    meta["text"] = {
        "path": args.text or f"tqcache/data/{DEFAULT_TEXT_NAME}",
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    if args.out:
        for p in save_results(rows, meta, args.out, stem=stem):
            print(f"wrote {p}")
    return 0
