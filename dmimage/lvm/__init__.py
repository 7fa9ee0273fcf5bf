"""LVM2 volume groups inside disk images, read offline (no lvm2, no activation).

ondisk.py finds PV labels and metadata areas (layouts in format/lvm.py), text.py parses and
formats lvm2's metadata text, model.py types it, vg.py picks the newest generation, view.py
maps LV extents, thin.py opens thin pools through their hidden LVs; check.py, report.py and
export.py serve `dmimage lvm`; commit.py writes a new metadata generation, fix.py and
orphans.py the offline fixes, create.py a new PV and VG for `dmimage build`.
"""
