"""Target networks and how to train and score them on images.

The networks RPG generates in this project (and the backbone of the task zoo) are image classifiers. This
package holds what every experiment needs of them, once: the architecture registry (any timm name plus the
project's CIFAR CNNs), image preprocessing, the one classifier-training loop and the one image evaluator.

Importing `rpg.vision.cifar_cnn` registers the project's CNNs (rpg_cifar_cnn*, rpg_cnn_s, rpg_cnn_m) with timm. It
is not imported here: timm takes ~5 s to import, and many jobs (reading features, scoring heads) build no network.
"""
