"""Image I/O with geometry."""
from .image import Image, ImageError, case_id_from_path
from .formats import IMAGE_2D_EXTS, VOLUME_EXTS, is_image_file, read_image, read_label, write_image

__all__ = ["Image", "ImageError", "case_id_from_path", "IMAGE_2D_EXTS", "VOLUME_EXTS", "is_image_file",
           "read_image", "read_label", "write_image"]
