"""mmdrq's deploy-host side: read an export folder and run it in ONNX Runtime.

Needs only numpy, onnx and onnxruntime (no torch, no OpenMMLab, no mmdrq
training code), so a serving host installs just these.
"""
from .artifact import ExportFolder, read_meta
from .session import SwitchableSession, integer_sums, make_session

__all__ = ['ExportFolder', 'SwitchableSession', 'integer_sums',
           'make_session', 'read_meta']
