"""LVM2 volume groups inside disk images, read offline (no lvm2, no activation).

ondisk.py finds PV labels and metadata areas (layouts in format/lvm.py), text.py parses and
formats lvm2's metadata text, model.py types it, vg.py picks the newest generation, view.py
maps LV extents, thin.py opens thin pools through their hidden LVs, commit.py writes a new
metadata generation.
"""
