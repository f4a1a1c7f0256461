"""ImageNet weights for EfficientNet-B0: the four sources' layouts (`sources.py`),
converting a checkpoint (`conversion.py`) and the converted folder (`folder.py`)."""
