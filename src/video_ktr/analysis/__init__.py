"""Tools over runs: reports, the demo and the ablation, the memory estimate."""
