"""Target networks and how to train and score them on images.

The networks RPG generates in this project (and the backbone of the task zoo) are image classifiers. This
package holds what every experiment needs of them, once: the architecture registry (any timm name plus the
project's CIFAR CNNs, registered with timm on import), image preprocessing, the one classifier-training loop and
the one image evaluator.
"""

from rpg.vision import cifar_cnn  # noqa: F401  (registers rpg_cifar_cnn*, rpg_cnn_s, rpg_cnn_m with timm)
from rpg.vision.cifar_cnn import CifarCNN, TinyCNN

__all__ = ["CifarCNN", "TinyCNN"]
