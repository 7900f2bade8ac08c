"""Domain logic, one module per resource; functions take keyword-only arguments and raise `shared.errors`."""
