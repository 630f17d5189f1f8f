"""Image I/O with geometry (:mod:`.formats`), and label maps on disk (:mod:`.labels`)."""
from .image import Image, ImageError, case_id_from_path
from .formats import IMAGE_2D_EXTS, VOLUME_EXTS, is_image_file, read_image, write_image
from .labels import (PSEUDO_LABEL_DIR, label_path, pseudo_label_dir, read_label, read_sidecar, write_label,
                     write_sidecar)

__all__ = ["Image", "ImageError", "case_id_from_path", "IMAGE_2D_EXTS", "VOLUME_EXTS", "is_image_file",
           "read_image", "read_label", "write_image", "PSEUDO_LABEL_DIR", "label_path", "pseudo_label_dir",
           "read_sidecar", "write_label", "write_sidecar"]
