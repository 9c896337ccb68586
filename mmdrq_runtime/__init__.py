"""mmdrq's deploy-host side: read an export folder and run it in ONNX Runtime.

Needs only numpy, onnx and onnxruntime, and OpenCV for the image-in
``Inferencer`` (no torch, no OpenMMLab, no mmdrq training code), so a
serving host installs just these.
"""
from .artifact import ExportFolder, read_meta
from .inferencer import Inferencer
from .session import SwitchableSession, integer_sums, make_session

__all__ = ['ExportFolder', 'Inferencer', 'SwitchableSession', 'integer_sums',
           'make_session', 'read_meta']
