"""Neural-network building blocks: Mamba2 (with a pure-PyTorch fallback) and the SSD scan."""
