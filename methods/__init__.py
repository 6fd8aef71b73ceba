"""Pure-PyTorch video generation methods and the registry that names them."""

from methods.base import Conditioning, DataSpec, VideoBatch, VideoGenerator
from methods.cmd import CMD
from methods.vdm import VDM

# A plain dict of explicit imports: adding a method is one import and one line here.
METHODS: dict[str, type[VideoGenerator]] = {
    "vdm": VDM,
    "cmd": CMD,
}

__all__ = ["METHODS", "Conditioning", "DataSpec", "VideoBatch", "VideoGenerator"]
