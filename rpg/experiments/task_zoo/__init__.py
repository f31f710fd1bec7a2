"""Paper §5: the 1022-task binary CIFAR-10 zoo, conditional RPG, unseen tasks (Tables 11, 12, 13, 16)."""
