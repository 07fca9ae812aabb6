"""tqcache: TurboQuant-compressed KV caches for Hugging Face transformers."""

from .codec import AffineQuantizer, Packed, TurboQuantizer
from .config import SCHEMES, CacheConfig, CodecConfig, parse_scheme
from .attention import register as _register_attention
from .cache import CacheMemory, TurboQuantCache
from .persist import CacheFileError, load_cache, save_cache

_register_attention()

__version__ = "0.1.0"

__all__ = [
    "AffineQuantizer",
    "CacheConfig",
    "CacheFileError",
    "CacheMemory",
    "TurboQuantCache",
    "CodecConfig",
    "Packed",
    "SCHEMES",
    "TurboQuantizer",
    "load_cache",
    "parse_scheme",
    "save_cache",
    "__version__",
]
