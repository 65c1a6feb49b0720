"""What one site does in a federation, and the wire contract, without importing flwr.

The Flower apps in ``server/`` and ``client/`` unpack messages, call these functions and
pack the replies; everything here is plain torch/numpy and testable without Flower.
"""
