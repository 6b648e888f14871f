"""Colour tables beside every label map the bundle saves (3D Slicer ``.ctbl``, ITK-SNAP label descriptions), so the
label values arrive with their names and colours (``palette``)."""

from __future__ import annotations

from collections.abc import Mapping

from monai.transforms import MapTransform

from ..palette import write_colour_tables


class SaveColourTablesd(MapTransform):
    """After ``SaveImaged(savepath_in_metadict=True)``: beside each saved label map (its ``meta["saved_to"]``), the
    colour tables of ``label_names`` (label value to name), written atomically."""

    def __init__(self, keys, label_names: Mapping[int, str], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_names = {int(v): str(n) for v, n in dict(label_names).items()}

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            saved = getattr(d[key], "meta", {}).get("saved_to")
            if saved:
                write_colour_tables(str(saved), self.label_names)
        return d
