"""The features of a policy, one module each, each with its own small state.

Every feature module provides ``init(xp, policy, n_tensors, like)``, which
returns its state (a ``NamedTuple`` of arrays, or :class:`Empty` when the
policy does not use the feature), and ``SKIPPABLE``, the names of the state
fields a skipped update may change (:func:`safeopt._state.keep_on_skip`
restores every other field). :mod:`safeopt._state` lists the features in
order; :mod:`safeopt._pipeline` runs them.
"""
