"""Paper §2a: generation across architectures (Table 1) and its ablations (Tables 4-7)."""
