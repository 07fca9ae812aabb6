"""tqcache: TurboQuant-compressed KV caches for Hugging Face transformers."""

from .codec import AffineQuantizer, Packed, TurboQuantizer
from .config import SCHEMES, CacheConfig, CodecConfig, parse_scheme
from .attention import register as _register_attention
from .cache import CacheMemory, TurboQuantCache

_register_attention()

__version__ = "0.1.0"

__all__ = [
    "AffineQuantizer",
    "CacheConfig",
    "CacheMemory",
    "TurboQuantCache",
    "CodecConfig",
    "Packed",
    "SCHEMES",
    "TurboQuantizer",
    "parse_scheme",
    "__version__",
]
