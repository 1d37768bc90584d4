"""Fusion patterns. Each module here registers one pattern with fusion_backend.registry;
the backend discovers them by file, so adding a pattern touches nothing else."""
