"""Workaround #10: pyvene's gather/scatter indices on the device of the activation they index.

pyvene builds its gather/scatter indices on ``model.device``, the device of the model's first parameter. For an
offloaded model that is ``meta``, and a gather with a meta index returns uninitialised memory (silently wrong
readouts); for a model split over GPUs it is the first GPU, wrong for later layers -> `index_on_activation_device`.

Test: tests/test_offload.py (test_bug10_raw_pyvene_indexes_on_meta_and_the_workaround_on_the_activations_device).
Remove when: pyvene builds the indices on the activation's device (``device=None`` in ``gather_neurons`` /
``scatter_neurons``; not so on main as of 9e33390), and the pinned pyvene is that release.
"""

from __future__ import annotations

import pyvene as pv


def index_on_activation_device(pvm: pv.IntervenableModel) -> pv.IntervenableModel:
    """Build this IntervenableModel's gather/scatter indices on the device of the activation they index.

    pyvene passes ``device=self.get_device()`` (``model.device``) to ``gather_neurons``/``scatter_neurons``;
    with ``device=None`` they use the activation's own device, which is right for every layout. Only this
    instance changes (its ``get_device`` returns None); pyvene's class is left alone, and a user's own
    IntervenableModel over an offloaded or split model can opt in with this function.
    """
    pvm.get_device = lambda: None
    return pvm
