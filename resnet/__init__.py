"""N2UQ ResNet-18/34/50 (docs/SPEC.md, architectures)."""
