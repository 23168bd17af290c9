"""OpenVision-tower LLaVA processing lives beside its model."""

from ..models.openvision_llava import Processor

__all__ = ["Processor"]
