"""skd: self-knowledge distillation for timm models."""
__version__ = "0.1.0"
