"""Custom-op layer: one module per op (schema, fake kernel, autograd, device dispatch)."""
