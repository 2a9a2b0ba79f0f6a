"""fedilora: federated multimodal LoRA fine-tuning with heterogeneous ranks and missing modalities."""

__version__ = "0.1.0"
