"""Models: built-in architectures, checkpoints, and training with checkpoints."""
from .zoo import ARCHITECTURES, ResNetLike, VGGLike, build_model
from .checkpoints import Checkpoint, load_checkpoint, list_checkpoints, save_checkpoint, validate_checkpoints

__all__ = [
    "ARCHITECTURES", "ResNetLike", "VGGLike", "build_model",
    "Checkpoint", "load_checkpoint", "list_checkpoints", "save_checkpoint", "validate_checkpoints",
]
