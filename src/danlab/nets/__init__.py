"""Architectures for the learned analysis increment a_theta."""

from danlab.nets.cnn import NetConfig, AnalysisNet, build_net

__all__ = ["NetConfig", "AnalysisNet", "build_net"]
