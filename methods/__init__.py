"""Pure-PyTorch video generation methods and the registry that names them."""

from methods.base import Conditioning, DataSpec, VideoBatch, VideoGenerator
from methods.cmd import CMD
from methods.dvdm import DVDM, EDVDM
from methods.pvdm import PVDM
from methods.vdm import VDM
from methods.videofusion import VideoFusion

# A plain dict of explicit imports: adding a method is one import and one line here.
METHODS: dict[str, type[VideoGenerator]] = {
    "vdm": VDM,
    "videofusion": VideoFusion,
    "cmd": CMD,
    "dvdm": DVDM,
    "edvdm": EDVDM,
    "pvdm": PVDM,
}

__all__ = ["METHODS", "Conditioning", "DataSpec", "VideoBatch", "VideoGenerator"]
