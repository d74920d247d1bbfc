"""Models described by a saved folder's ``config.json``: Hugging Face ``transformers`` models and conceptevo's own.

``arch = "hf:FOLDER"`` builds the model that ``FOLDER/config.json`` describes,
with random weights (a checkpoint then loads into it):

* a ``config.json`` with ``"conceptevo_arch": NAME`` (conceptevo's own saved
  models) is built from the zoo, ``build_model(NAME, **the other entries)``;
* any other ``config.json`` is a Hugging Face ``transformers`` config, built
  with the class its ``architectures`` entry names (``GPTNeoXForCausalLM``,
  ``ViTForImageClassification``...), else ``AutoModel``. This needs the
  ``transformers`` extra (``pip install 'conceptevo[transformers]'``).

``FOLDER`` may be one model folder (``save_pretrained``'s output) or a folder
of them (one per training step); then the first step's config is read.

Nothing is ever downloaded: before ``transformers`` is imported the offline
flags ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set in the
environment, and configs are read with ``local_files_only=True``.

A ``transformers`` model returns an output object; with ``logits=True`` (the
default) the built model returns its ``logits`` tensor instead, as the rest of
conceptevo expects of a classifier. Its module names and state_dict keys are
the ``transformers`` ones (``vit.encoder.layer.0.intermediate.intermediate_act_fn``...).
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, ConceptEvoError
from ..io import read_json
from ..offline import EXTRA, OFFLINE_FLAGS, import_transformers  # noqa: F401 (re-exported)
from .checkpoints import CONFIG_FILE, is_model_folder, list_checkpoints

log = logging.getLogger(__name__)


def config_folder(path, import_path=None) -> Path:
    """The folder whose ``config.json`` describes the model at ``path`` (a model folder, or a folder of step folders)."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists():
        roots = [import_path] if isinstance(import_path, (str, Path)) else list(import_path or [])
        for root in roots:
            if (Path(root) / path).exists():
                path = Path(root) / path
                break
    if not path.exists():
        raise ConceptEvoError(f"arch 'hf:{path}': no such folder; give a model folder (config.json + weights, as "
                              "save_pretrained writes) or a folder of them, one per step")
    if path.is_file():
        if path.name == CONFIG_FILE:
            return path.parent
        raise ConceptEvoError(f"arch 'hf:{path}' is a file; give the folder that holds its {CONFIG_FILE}")
    if (path / CONFIG_FILE).is_file():
        return path
    if not is_model_folder(path):
        try:
            cks = list_checkpoints(path)
        except CheckpointError:
            cks = []
        for c in cks:
            if (Path(c.path) / CONFIG_FILE).is_file():
                return Path(c.path)
    raise ConceptEvoError(f"arch 'hf:{path}': no {CONFIG_FILE} in it or in the step folders under it; "
                          "a model folder needs the config.json that save_pretrained writes")


def build_from_config(path, in_channels: int | None = None, num_classes: int | None = None, logits: bool = True,
                      import_path=None, build_builtin=None, **options) -> nn.Module:
    """The model ``path``'s ``config.json`` describes, randomly initialised (see the module docstring).

    ``options``: for a conceptevo config, constructor arguments that override
    the saved ones; for a ``transformers`` config, config attributes to
    override (``attn_implementation="eager"``...). ``in_channels`` and
    ``num_classes`` (the study's defaults) fill in only what the config does
    not state: a saved model's config says what it was trained with.
    """
    folder = config_folder(path, import_path)
    raw = read_json(folder / CONFIG_FILE)
    if not isinstance(raw, dict):
        raise ConceptEvoError(f"{folder / CONFIG_FILE} is not a JSON object; re-save the model")
    if "conceptevo_arch" in raw:
        if build_builtin is None:  # the zoo passes its build_model (the zoo imports this module, not the reverse)
            raise ConceptEvoError(f"{folder / CONFIG_FILE} describes a built-in model; build it with "
                                  "conceptevo.build_model('hf:FOLDER')")
        kwargs = {k: v for k, v in raw.items() if k != "conceptevo_arch"}
        given = {"in_channels": in_channels, "num_classes": num_classes}
        for k, v in given.items():
            if v is not None and k not in kwargs and k not in options:
                kwargs[k] = v
        kwargs.update(options)
        return build_builtin(str(raw["conceptevo_arch"]), **kwargs)
    tf = import_transformers(f"the model of {folder / CONFIG_FILE}")
    attn = options.pop("attn_implementation", None)
    try:
        config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True, **options)
    except Exception as e:
        raise ConceptEvoError(f"transformers cannot read {folder / CONFIG_FILE} ({str(e).splitlines()[0][:200]}); "
                              "check that it is a transformers config, and the transformers version") from None
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(tf, n) for n in names if hasattr(tf, n)), None)
    extra = {"attn_implementation": attn} if attn else {}
    if cls is not None:
        model = cls._from_config(config, **extra)
    else:
        log.info("%s names no transformers class this version has (%s): built with AutoModel", folder / CONFIG_FILE,
                 ", ".join(names) or "no architectures entry")
        model = tf.AutoModel.from_config(config, **extra)
    model.eval()
    return returning_logits(model) if logits else model


_LOGITS_CLASSES: dict[type, type] = {}


def returning_logits(model: nn.Module) -> nn.Module:
    """``model`` (in place) with ``forward`` returning its output's ``logits`` tensor (or first entry), a plain tensor.

    The class is swapped for a subclass of the same name, so module names,
    state_dict keys and hooks are unchanged.
    """
    base = type(model)
    if getattr(base, "_conceptevo_logits", False):
        return model
    if base not in _LOGITS_CLASSES:
        def forward(self, *args, **kwargs):
            out = base.forward(self, *args, **kwargs)
            if hasattr(out, "logits") and out.logits is not None:
                return out.logits
            if isinstance(out, (tuple, list)):
                return out[0]
            if hasattr(out, "last_hidden_state"):
                return out.last_hidden_state
            return out

        _LOGITS_CLASSES[base] = type(base.__name__, (base,), {"forward": forward, "_conceptevo_logits": True,
                                                              "__module__": base.__module__, "__doc__": base.__doc__})
    model.__class__ = _LOGITS_CLASSES[base]
    return model
