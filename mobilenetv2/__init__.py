"""N2UQ MobileNetV2 (SPEC §5)."""
