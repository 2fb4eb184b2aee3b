"""Benchmarks: scripts that measure and print tables (never timed tests).

``python -m skd.bench NAME [options]`` runs ``skd.bench.<NAME>`` (a dash in NAME is an
underscore in the module name); every such module has ``main(argv) -> int``.
"""
