"""pairfree: unified multi-modal embedding spaces from pretrained contrastive models, no paired data.

The library imports only numpy at the top level; torch-based pieces load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from pairfree.space import Space, SpaceError  # noqa: E402

_LAZY = {
    "aggregate": "pairfree.memory",
    "CMCR": "pairfree.connect",
    "CMCRConfig": "pairfree.connect",
    "ExMCR": "pairfree.extend",
    "ExMCRConfig": "pairfree.extend",
    "load_encoder": "pairfree.encoders.registry",
    "load_model": "pairfree.models",
    "UnifiedModel": "pairfree.unified",
    "search": "pairfree.search",
    "metrics": "pairfree.metrics",
    "baselines": "pairfree.baselines",
    "RelativeMap": "pairfree.baselines",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'pairfree' has no attribute {name!r}")


__all__ = ["Space", "SpaceError", *_LAZY]
