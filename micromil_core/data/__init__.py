"""Site folders, bags, feature files, partitioning and the bundled real datasets."""
