"""N2UQ ResNet-18/34/50 (SPEC §5)."""
