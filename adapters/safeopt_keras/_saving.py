"""The wrapper's variables in a saved model: this version's layout, the previous one, 0.1's.

Layout 3 (this version) saves every variable of ``optimizer.variables`` in
order: the base optimizer's own, safeopt's state, the recovery snapshot
(with ``recover``), then the inner optimizer's. Layout 2 had no snapshot: a
file from it loads with no snapshot held (the next healthy update on the
cadence takes one). safeopt 0.1 saved no layout and fewer state fields,
upgraded on load.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

import safeopt.adapter as sa

#: Marks the variable layout of this version in a saved optimizer (0.1 had none).
LAYOUT_KEY, LAYOUT = "safeopt_layout", 3


def load(opt: Any, store: Any) -> None:
    """Loads saved variables into the built wrapper ``opt``, from any layout."""
    if LAYOUT_KEY not in store:
        _load_0_1(opt, store)
        return
    layout = int(np.asarray(store[LAYOUT_KEY]))
    snapshot = opt._snapshot
    if layout >= 3 or snapshot is None:
        for i, variable in enumerate(opt.variables):
            variable.assign(store[str(i)])
        return
    n_own = len(opt._variables) - snapshot.size  # the snapshot's variables come last
    for i in range(n_own):
        opt._variables[i].assign(store[str(i)])
    for j, variable in enumerate(opt.inner_optimizer.variables):
        variable.assign(store[str(n_own + j)])
    snapshot.forget(opt)


def _load_0_1(opt: Any, store: Any) -> None:
    """safeopt 0.1's layout: the base variables, its state fields, the inner optimizer's."""
    n_base = opt._n_base
    legacy = {name: np.asarray(store[str(n_base + i)]) for i, name in enumerate(sa.FIELDS_0_1)}
    for i in range(n_base):
        opt._variables[i].assign(store[str(i)])
    current = {key: np.asarray(ops.convert_to_numpy(opt._variables[i]))
               for key, i in opt._slots.items()}
    template = sa.unflatten(opt._initial_state(len(opt._trainable_variables)), current)
    restored = sa.flatten(sa.unflatten(template, sa.upgrade(legacy)))
    for key, i in opt._slots.items():
        opt._variables[i].assign(restored[key])
    offset = n_base + len(sa.FIELDS_0_1)
    for j, variable in enumerate(opt.inner_optimizer.variables):
        variable.assign(store[str(offset + j)])
    if opt._snapshot is not None:
        opt._snapshot.forget(opt)
