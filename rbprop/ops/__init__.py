"""The primitives, one module per family: elementwise, reduction, shape, linalg, nn."""
