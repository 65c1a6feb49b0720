"""The Flower ClientApp that each hospital runs over its own site folder."""
