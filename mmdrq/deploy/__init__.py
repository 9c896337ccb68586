"""Deployment: per-bit ONNX QDQ export and ONNX Runtime sessions."""
from .onnx_export import OnnxExporter, check_bits_setting, check_exportable

__all__ = ['OnnxExporter', 'check_bits_setting', 'check_exportable']
