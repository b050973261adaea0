"""Pictures of what an encoder learned: reconstructions, attention, position tables, PCA; ``mpp visualize``."""
