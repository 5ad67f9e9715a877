"""N2UQ MobileNetV2 (docs/SPEC.md, architectures)."""
