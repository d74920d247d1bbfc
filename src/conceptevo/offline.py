"""Hugging Face libraries, offline: the flags that keep them off the network, and ``transformers`` imported after them.

Nothing conceptevo does may download a model, a tokenizer or a config. Every
place that touches ``transformers`` (model folders, GPT-NeoX, Hugging Face
tokenizers) goes through :func:`import_transformers`, which sets the offline
flags before the import and says so once in the log.
"""
from __future__ import annotations

import logging
import os

from .errors import ConceptEvoError

log = logging.getLogger(__name__)

OFFLINE_FLAGS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
EXTRA = "transformers"
_said_offline = False


def set_hf_offline() -> None:
    """Set the Hugging Face offline flags, so nothing here ever reaches the network."""
    os.environ.update(OFFLINE_FLAGS)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def import_transformers(what: str = "this model"):
    """The ``transformers`` module, imported offline (the flags set first); a clear error naming the extra when missing."""
    global _said_offline
    set_hf_offline()
    try:
        import transformers
    except ImportError as e:
        raise ConceptEvoError(
            f"{what} needs the Hugging Face 'transformers' package ({e}); install the '{EXTRA}' extra: "
            f"pip install 'conceptevo[{EXTRA}]' (or pip install transformers)"
        ) from None
    if not _said_offline:
        log.info("transformers %s runs offline here (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1): models are built from "
                 "local config.json files, nothing is downloaded", transformers.__version__)
        _said_offline = True
    return transformers
