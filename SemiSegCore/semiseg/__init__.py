"""SemiSeg core: annotation-efficient medical image segmentation (never imports slicer or Qt)."""
__version__ = "0.1.0"
