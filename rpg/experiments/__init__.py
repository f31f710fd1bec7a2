"""Experiment families built on the method in `rpg`: `task_zoo` (paper §5: 1022 binary CIFAR-10 tasks, unseen
tasks, Tables 11-13 and 16) and `arch_study` (paper §2a: Table 1 and its ablations), plus the glue that workflow
rules (`rules`) and notebooks (`notebooks`) share. The method never imports from here, and the two families do not
import each other (tests/test_layers.py).
"""
