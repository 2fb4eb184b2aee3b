"""Training methods, one module each, behind the ``Method`` protocol (see ``base.py``)."""
from skd.methods.base import DataSpec, Method, MethodConfig
from skd.methods.registry import (create_method, get_method_class, get_method_config_class,
                                  list_methods, register_method)

# Importing a method module registers it.
from skd.methods import byot, ce, cskd, dlb, ickd, kd, nkd, pskd, tfkd, uskd  # noqa: E402,F401  isort: skip
from skd.methods import bake, zipf_ls  # noqa: E402,F401  isort: skip
from skd.methods import at, cc, crd, fitnet, fsp, nst, pkt, rkd, sp, vid  # noqa: E402,F401  isort: skip

__all__ = ["DataSpec", "Method", "MethodConfig", "create_method", "get_method_class",
           "get_method_config_class", "list_methods", "register_method"]
