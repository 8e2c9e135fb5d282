"""Experiments that back the claims in docs/: one driver per method, each runnable as `python -m fuxi.experiments.NAME`.

They sit at the top of the layout, beside `launch/`: they may import every other package; nothing imports them.
"""
