"""Target networks, registered with timm on import (``timm.create_model("rpg_...")``)."""

from . import cifar_cnn  # noqa: F401  (registers rpg_cifar_cnn*, rpg_cnn_s, rpg_cnn_m)
from .cifar_cnn import CifarCNN, TinyCNN

__all__ = ["CifarCNN", "TinyCNN"]
