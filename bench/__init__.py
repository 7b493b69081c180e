"""nanolm's benchmark suite: every hot op and the training step, for every backend the op layer
reports as available, against the PyTorch baselines a user would otherwise pick, reported as
time, GB/s or TFLOP/s and % of the machine's own measured ceilings.

Layout: formulas.py (the byte and FLOP counts, in one place), timing.py (ceilings, timers,
peak memory), cases.py (the Case/Impl records and the op table), op_*.py (one file per op:
shapes and implementations), runner.py (correctness check, then timing), report.py (markdown,
JSON, plots), collect.py / readme_table.py (committed results and the README table).
Run `python -m bench --help`; see bench/README.md.
"""
