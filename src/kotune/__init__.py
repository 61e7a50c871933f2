"""kotune: QLoRA fine-tuning of LLMs on instruction data, from one YAML file."""

__version__ = "0.1.0"
