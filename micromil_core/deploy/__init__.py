"""Deployment helpers behind ``flower-server`` and ``flower-client``: configs, PKI, processes.

Never imports flwr: Flower's runtime (``flower-superlink``, ``flower-supernode``, ``flwr``)
is driven through its command-line programs, the interface Flower documents for operators.
"""
