"""dafl: data-free knowledge distillation (DAFL) with Lightning."""
from __future__ import annotations

__all__ = ["load_student", "__version__"]
__version__ = "0.1.0"


def load_student(path):
    """A ready nn.Module (eval mode) from an exported `student.safetensors`."""
    from dafl.export import load_student as _load

    return _load(path)
