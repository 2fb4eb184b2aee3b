"""``skd sweep``: a paper's table × seeds in one command.

- ``skd.sweep.plan``: tables and presets × seeds → resolved configs in ``DIR/sweep.json``;
- ``skd.sweep.runs``: that file and each run's state, read from the run folders alone;
- ``skd.sweep.local``: the runs on this machine, one or several at a time;
- ``skd.sweep.slurm``: the runs as one SLURM job array, and the array task itself;
- ``skd.sweep.cli``: the command.
"""
