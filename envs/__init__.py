"""Gymnasium environments of rlweights, registered as "rlweights/<Name>-v0".

They arrive with their own issue; the package exists so that ``pip install -e .`` installs it.
"""
