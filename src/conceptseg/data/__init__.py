"""Datasets for conceptseg.

Submodules are imported explicitly (e.g. ``from conceptseg.data import toyworld``)
so that importing this package stays cheap.
"""
