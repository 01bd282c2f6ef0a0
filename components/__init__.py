"""latentlab's library: plain functions and Lightning modules, no orchestration.

Everything here can be used from a notebook; the Prefect flows in ``flows/`` only call it.
"""
