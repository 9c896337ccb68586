"""Deployment: per-bit ONNX QDQ export and ONNX Runtime sessions."""
from mmdrq_runtime import SwitchableSession, make_session, read_meta
from .onnx_export import OnnxExporter, check_bits_setting, check_exportable
from .pipeline import export_to_folder, load_for_export

__all__ = [
    'OnnxExporter', 'SwitchableSession', 'check_bits_setting',
    'check_exportable', 'export_to_folder', 'load_for_export',
    'make_session', 'read_meta'
]
