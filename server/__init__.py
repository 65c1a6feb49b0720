"""The Flower ServerApp of micromil-fl and the one-machine simulation runner."""
