"""C-NMC data layer: file names, dataset layouts, synthetic data, splits and the prepare cache."""
