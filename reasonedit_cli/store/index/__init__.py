"""Derived retrieval index of a codebook: sigma, neighbour lists, graphs, deltas, lifted graph.

Everything here is rebuildable from the committed keys; the reader and the writer hand a
``DerivedIndex`` object over instead of writing each other's fields.
"""
